"""What a new user meets first, against the real notebook image and Docker engine: a session's
log starts with the program's own output, and JupyterLab does not ask about Jupyter news.

Every container carries a per-test label and is removed afterwards, also when the test fails.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from nsml_server.backends import DockerBackend, RunSpec, RunState
from tests.integration.test_image import check

pytestmark = pytest.mark.docker


@pytest.fixture()
def label(docker_client: Any) -> Iterator[dict[str, str]]:
    value = uuid.uuid4().hex[:12]
    yield {"nsml-test": value}
    for c in docker_client.containers.list(
        all=True, sparse=True, filters={"label": f"nsml-test={value}"}
    ):
        c.remove(force=True, v=True)


def test_a_session_log_starts_with_the_programs_output_not_a_tini_warning(
    singleuser_image: str, label: dict[str, str]
) -> None:
    # A session container as the runner makes it: Docker's init as PID 1, the image's own
    # entrypoint (tini) in front of the command.
    spec = RunSpec(
        name=f"nsml-test-{label['nsml-test']}-tini",
        image=singleuser_image,
        command=["python", "-c", "print('first line of the session', flush=True)"],
        labels=dict(label),
    )

    async def go() -> str:
        backend = DockerBackend(timeout_s=60)
        try:
            handle = await backend.start(spec)
            status = await backend.wait(handle, timeout_s=60)
            assert (status.state, status.exit_code) == (RunState.EXITED, 0)
            return await backend.logs(handle)
        finally:
            await backend.close()

    logs = asyncio.run(go())
    assert logs.splitlines()[0] == "first line of the session", logs
    assert "tini" not in logs.lower(), logs


# Runs inside the image as jovyan: starts JupyterLab as a notebook server would and asks its
# settings API what the news setting is (the schema's defaults as the image's overrides.json
# changes them, under the user's settings), then where the overrides file lives.
LAB_SETTINGS = r"""
import json, socket, subprocess, sys, time, urllib.request
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
lab = subprocess.Popen(
    [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
     "--IdentityProvider.token=t", "--ServerApp.open_browser=False"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
url = f"http://127.0.0.1:{port}/lab/api/settings/@jupyterlab/apputils-extension:notification"
try:
    for _ in range(600):
        try:
            req = urllib.request.Request(url, headers={"Authorization": "token t"})
            body = json.load(urllib.request.urlopen(req, timeout=2))
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise SystemExit("JupyterLab did not answer")
finally:
    lab.terminate(); lab.wait(30)
from jupyterlab.commands import get_app_dir
# The server applies overrides.json to the schema's defaults; user settings come on top.
defaults = {k: v.get("default") for k, v in body["schema"]["properties"].items()}
print("RESULT " + json.dumps({"composite": {**defaults, **body["settings"]},
                              "app_dir": get_app_dir()}))
"""


def test_the_notebook_images_jupyterlab_does_not_ask_about_jupyter_news(
    docker_client: Any, singleuser_image: str
) -> None:
    out = check(docker_client, singleuser_image, ["python", "-c", LAB_SETTINGS])
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    found = json.loads(line.removeprefix("RESULT "))
    assert found["composite"]["fetchNews"] == "false", found
    assert found["composite"]["checkForUpdates"] is False, found
    overrides = check(
        docker_client, singleuser_image, ["cat", f"{found['app_dir']}/settings/overrides.json"]
    )
    assert json.loads(overrides)["@jupyterlab/apputils-extension:notification"] == {
        "fetchNews": "false",
        "checkForUpdates": False,
    }
