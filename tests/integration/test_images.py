"""Only images the operator allows run, and a bad name fails at submit, never at container start.

A real hub whose allowed list is its default: the platform's own notebook image. Sessions (the
CLI, as a user types it), forks, placements and the spawn form refuse an image that is not a
Docker reference, or one the list does not allow, with a 400 that lists the allowed images;
nothing is queued or started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_hub import assert_json_error
from tests.integration.test_spawner import placements, servers, spawn, stopped  # noqa: F401

pytestmark = [pytest.mark.hub, pytest.mark.docker]

NSML = str(Path(sys.executable).parent / "nsml")

BAD = [
    pytest.param("evil;rm -rf /", "invalid_image", "is not a valid image name", id="not a name"),
    pytest.param("$(reboot)", "invalid_image", "is not a valid image name", id="substitution"),
    pytest.param(
        "evil/miner:latest", "image_not_allowed", "is not allowed on this platform", id="other"
    ),
]


@pytest.mark.parametrize(("image", "reason", "words"), BAD)
def test_a_placement_with_a_bad_image_is_refused_listing_the_allowed_ones(
    hub: HubProcess, image: str, reason: str, words: str
) -> None:
    token = hub.user_token("img-place")
    r = hub.nsml("POST", "placements", token, json={"holder": "x", "image": image})
    body = assert_json_error(r, 400, reason)
    assert words in body["message"]
    if reason == "image_not_allowed":
        assert f"allowed: {hub.env_overrides['NSML_NOTEBOOK_IMAGE']}." in body["message"]
    assert hub.nsml("GET", "placements", token).json()["placements"] == []


def run_cli(hub: HubProcess, token: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    env.update(NSML_API_URL=hub.nsml_api + "/", NSML_TOKEN=token)
    return subprocess.run(
        [NSML, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(("image", "reason", "words"), BAD)
def test_a_session_with_a_bad_image_is_refused_at_submit_in_one_line(
    hub: HubProcess, tmp_path: Path, image: str, reason: str, words: str
) -> None:
    (tmp_path / "train.py").write_text("print('hi')\n")
    token = hub.user_token("img-run")
    r = run_cli(hub, token, tmp_path, "run", "--image", image, "train.py")
    assert r.returncode == 2, (r.stdout, r.stderr)
    # Notes (what was uploaded) may come first; the refusal is one line, and the last.
    errors = [line for line in r.stderr.strip().splitlines() if line.startswith("nsml:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == errors[0]
    sessions = hub.nsml("GET", "sessions", token).json()["sessions"]
    assert sessions == []


def test_a_fork_with_an_image_that_is_not_allowed_is_refused(
    hub: HubProcess, tmp_path: Path
) -> None:
    (tmp_path / "train.py").write_text("print('hi')\n")
    token = hub.user_token("img-fork")
    r = run_cli(hub, token, tmp_path, "run", "train.py")
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip().splitlines()[-1].split()[0]
    r = hub.nsml("POST", f"sessions/{name}/fork", token, json={"image": "evil/miner:latest"})
    body = assert_json_error(r, 400, "image_not_allowed")
    assert hub.env_overrides["NSML_NOTEBOOK_IMAGE"] in body["message"]
    assert len(hub.nsml("GET", "sessions", token).json()["sessions"]) == 1
    ok = hub.nsml(
        "POST",
        f"sessions/{name}/fork",
        token,
        json={"image": hub.env_overrides["NSML_NOTEBOOK_IMAGE"]},
    )
    assert ok.status_code == 201, ok.text
    for s in hub.nsml("GET", "sessions", token).json()["sessions"]:
        wait_for(
            lambda n=s["name"]: (
                hub.nsml("GET", f"sessions/{n}", token).json()["state"] in ("completed", "failed")
            ),
            timeout=90,
            what=f"{s['name']} ended",
        )


@pytest.mark.parametrize(("image", "reason", "words"), BAD)
def test_a_server_with_a_bad_image_is_refused_before_anything_is_allocated(
    hub: HubProcess,
    servers: list[str],  # noqa: F811
    image: str,
    reason: str,
    words: str,
) -> None:
    name = "img-spawn"
    servers.append(name)
    r = spawn(hub, name, image=image)
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json()["message"]
    if reason == "invalid_image":
        assert "is not a valid image name" in message, message
    else:
        assert f"is not allowed on this hub; valid: {hub.env_overrides['NSML_NOTEBOOK_IMAGE']}" in (
            message
        )
    wait_for(lambda: stopped(hub, name), timeout=30, what="no server")
    assert placements(hub, name) == []


def test_the_allowed_images_pass(hub: HubProcess, servers: list[str]) -> None:  # noqa: F811
    token = hub.user_token("img-ok")
    image: Any = hub.env_overrides["NSML_NOTEBOOK_IMAGE"]
    r = hub.nsml(
        "POST", "placements", token, json={"holder": "ok", "image": image, "cpu": 0.1, "memory": 64}
    )
    assert r.status_code in (201, 202), r.text
    released = hub.nsml("DELETE", f"placements/{r.json()['id']}", token)
    assert released.status_code == 200, released.text
    assert released.json()["state"] in ("cancelled", "released"), released.json()
