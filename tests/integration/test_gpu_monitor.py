"""GPU use over time for a real session: a node whose ``nsml-agent`` probes a programmed fake
NVML (``NSML_GPU_PROBE=tests.gpu_program:probe``) on the real hub, NSML server and Docker
engine. The session runs on that node's GPU; the agent's heartbeats carry the programmed
utilisation; ``%nsml gpumonitor`` in an IPython shell shows that curve, and ``nsml ps`` the
current use.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.conftest import agent_node, wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_sessions import cli_for, status, wait_state

pytestmark = [pytest.mark.hub, pytest.mark.docker]

NSML_AGENT = str(Path(sys.executable).parent / "nsml-agent")
NODE = "gpuprog-node"
MODEL = "PROG-GPU-T"
# 101 distinct values (37 and 101 are coprime): each value read names its place in the curve.
CURVE = [(37 * k) % 101 for k in range(101)]
MEMORY = [1000 + 10 * k for k in range(101)]

TRAIN_PY = """
import os, time
print("on", os.environ["NSML_NODE"], "GPUs", os.environ.get("NSML_GPUS"), flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.2)
"""


@pytest.fixture()
def programmed_node(hub: HubProcess) -> Iterator[str]:
    """A node of one programmed GPU, its containers on the hub's own engine."""
    program = {"gpus": 1, "model": MODEL, "utilization": {"0": CURVE}, "memory": {"0": MEMORY}}
    env = {
        "NSML_GPU_PROBE": "tests.gpu_program:probe",
        "NSML_TEST_GPU_PROGRAM": json.dumps(program),
        "PYTHONPATH": str(REPO),
    }
    docker_url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    with agent_node(hub, NODE, env, ["--docker-url", docker_url, "--interval", "1"]):
        yield NODE


def test_gpumonitor_shows_the_programmed_curve_of_a_running_session(
    hub: HubProcess, programmed_node: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN_PY)
    token = hub.user_token("gm-alice")
    nsml = cli_for(hub, token, project)
    name = nsml(
        "run", "--gpus", "1", "--gpu-model", MODEL, "--cpu", "0.25", "--memory", "256M", "train.py"
    ).stdout.strip()
    try:
        st = wait_state(nsml, name, ("running",))
        assert st["node"] == programmed_node, st

        def sampled() -> dict[str, Any] | None:
            answer = dict(hub.nsml("GET", f"sessions/{name}/gpu", token).json())
            gpus = answer["gpus"]  # none before the first sample
            return answer if gpus and len(gpus[0]["utilization_pct"]) >= 6 else None

        answer = wait_for(sampled, timeout=90, what="six samples of the session's GPU")
        util = answer["gpus"][0]["utilization_pct"]
        mem = answer["gpus"][0]["memory_used_mib"]
        # Each sample is a value of the programmed curve, in the curve's order (a heartbeat
        # the server coalesced may skip one, none comes back), with its memory beside it.
        places = [CURVE.index(int(u)) for u in util]
        assert places == sorted(set(places)), (util, places)
        assert mem == [MEMORY[k] for k in places], (mem, places)
        assert answer["gpus"][0]["gpu"] == "0" and answer["note"] is None

        # %nsml gpumonitor, as a notebook runs it: the summary and the curve drawn.
        env = {"NSML_API_URL": hub.nsml_api + "/", "NSML_TOKEN": token}
        with pytest.MonkeyPatch.context() as mp:
            for k in [k for k in os.environ if k.startswith(("NSML_", "JUPYTERHUB_"))]:
                mp.delenv(k)
            for k, v in env.items():
                mp.setenv(k, v)
            shell = InteractiveShell.instance()
            shell.run_line_magic("load_ext", "nsml_magics")
            magics = shell.magics_manager.registry["NSMLMagics"]
            magics._client = None
            shell.run_line_magic("nsml", f"gpumonitor {name}")
            out = capsys.readouterr().out
            from nsml import sessions
            from nsml.client import Client
            from nsml_magics.gpumonitor import build_gpu_panel

            shown = sessions.gpu_use(Client(), name)
        now = re.search(r"GPU 0: now (\d+)%, mean \d+%, peak (\d+)%", out)
        assert now is not None, out
        assert CURVE.index(int(now.group(1))) >= places[-1], "the newest sample, or a later one"
        peak = int(now.group(2))  # of the samples the magic was shown: no more than later
        assert peak >= max(util) and peak <= max(shown["gpus"][0]["utilization_pct"]), out
        drawn = build_gpu_panel(shown).children[0].renderers[0].data_source.data["util"]
        assert list(drawn) == shown["gpus"][0]["utilization_pct"]
        assert shown["gpus"][0]["utilization_pct"][: len(util)] == util, "samples only add"
        # nsml ps shows the current use of the session's GPUs.
        mine = next(s for s in json.loads(nsml("ps", "--json").stdout) if s["name"] == name)
        assert [int(g["utilization_pct"]) in CURVE for g in mine["gpu_use"]] == [True], mine
        row = next(ln for ln in nsml("ps").stdout.splitlines() if ln.startswith(name))
        assert re.search(r" gpu \d+% \d", row), row
    finally:
        nsml("exec", name, "--", "touch", "/tmp/go", check=False)
        nsml("stop", name, check=False)
        wait_state(nsml, name)
        assert status(nsml, name)["state"] in ("completed", "stopped")
