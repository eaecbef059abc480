"""Training sessions on a remote node: placed there, run by its engine over TLS, and followed,
entered and stopped through the usual commands; drain and undrain around running work."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nsml_magics.status import render_status
from tests.cluster.testbed import Testbed
from tests.integration.conftest import wait_for
from tests.integration.test_sessions import NSML, TRAIN_PY, cli_for, status, wait_state


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY)
    return folder


def session_containers(tb: Testbed, node: str, session_id: int) -> list[Any]:
    """Containers of session *session_id* on *node* (PREFIX-session-ID-ATTEMPT)."""
    return [
        c
        for c in tb.containers(node, all=True)
        if c.name.startswith(f"{tb.prefix}-session-{session_id}-")
    ]


def test_a_session_runs_on_node_b_and_ps_logs_exec_stop_and_the_status_line_work(
    testbed: Testbed, project: Path
) -> None:
    tb = testbed
    token = tb.hub.user_token("cl-se-alice")
    nsml = cli_for(tb.hub, token, project)
    with tb.only("node-b"):
        name = nsml(
            "run",
            "--gpus",
            "2",
            "--memory",
            "256M",
            "--cpu",
            "0.5",
            "train.py",
            "--",
            "--epochs",
            "1",
            "--steps",
            "600",
            "--sleep",
            "0.2",
        ).stdout.strip()
        st = wait_state(nsml, name, ("running",), timeout=120)
    assert st["node"] == "node-b", st
    sid = int(st["id"])

    # Read back from each engine: node B runs the container, nodes A and C do not.
    (c,) = session_containers(tb, "node-b", sid)
    assert session_containers(tb, "node-a", sid) == []
    assert session_containers(tb, "node-c", sid) == []
    assert c.status == "running"
    env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"].split(",") == [str(g) for g in st["gpu_ids"]]
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    host = c.attrs["HostConfig"]
    assert host["Memory"] == 256 * 1024 * 1024 and host["NanoCpus"] == 500_000_000
    assert host["NetworkMode"] == "host"

    # ps lists it; the live status line names node B and its GPUs.
    listed = json.loads(nsml("ps", "--json").stdout)
    assert [(s["name"], s["state"], s["node"]) for s in listed] == [(name, "running", "node-b")]
    line = render_status(status(nsml, name))
    assert "node-b GPU " + ",".join(str(g) for g in st["gpu_ids"]) in line, line
    assert ">running<" in line

    # exec runs inside the container on node B.
    out = nsml("exec", name, "--", "sh", "-c", 'echo "$NSML_NODE:$CUDA_VISIBLE_DEVICES"; ls')
    assert "node-b:0,1" in out.stdout and "train.py" in out.stdout, out.stdout

    # logs -f follows the output from node B until the session ends; stop ends it.
    follow = subprocess.Popen(
        [NSML, "logs", "-f", name],
        env={**cli_env(tb, token)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: "first line of user code" in nsml("logs", name).stdout,
            timeout=60,
            what="the session's first line in its log",
        )
        nsml("stop", name)
        st = wait_state(nsml, name, timeout=120)
        followed, _ = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait(10)
    assert st["state"] == "stopped", st
    assert follow.returncode == 0
    assert "first line of user code" in followed and "lr 0.1 GPUS 0,1" in followed, followed
    wait_for(
        lambda: session_containers(tb, "node-b", sid) == [],
        timeout=60,
        what="the stopped session's container removed from node B",
    )
    assert ">stopped<" in render_status(status(nsml, name))
    nsml("rm", name)


def cli_env(tb: Testbed, token: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    env.update(NSML_API_URL=tb.hub.nsml_api + "/", NSML_TOKEN=token)
    return env


def test_drain_moves_no_running_work_and_places_nothing_new_undrain_restores_it(
    testbed: Testbed, project: Path
) -> None:
    tb = testbed
    token = tb.hub.user_token("cl-drain")
    nsml = cli_for(tb.hub, token, project)
    placement: dict[str, Any] | None = None
    with tb.only("node-b"):
        name = nsml(
            "run",
            "--gpus",
            "1",
            "--memory",
            "256M",
            "train.py",
            "--",
            "--epochs",
            "1",
            "--steps",
            "600",
            "--sleep",
            "0.2",
        ).stdout.strip()
        st = wait_state(nsml, name, ("running",), timeout=120)
        assert st["node"] == "node-b"
        sid = int(st["id"])
        try:
            admin = cli_for(tb.hub, tb.admin_token, project)
            assert admin("nodes", "--drain", "node-b").stdout.strip() == "node-b: draining"
            assert tb.node("node-b")["state"] == "draining"
            # Every node drains now: a new request waits, saying why.
            r2 = tb.hub.nsml(
                "POST",
                "placements",
                token,
                json={
                    "holder": "cl-drain-new",
                    "gpus": 1,
                    "cpu": 0.1,
                    "memory": "64M",
                    "wait_s": 2,
                },
            )
            assert r2.status_code in (201, 202), r2.text
            placement = r2.json()
            assert placement["state"] == "waiting", placement
            # The running session is untouched: same node, same container, still running.
            assert status(nsml, name)["state"] == "running"
            (c,) = session_containers(tb, "node-b", sid)
            assert c.status == "running"
            # Undrain node B: the waiting request is placed there.
            assert admin("nodes", "--undrain", "node-b").stdout.strip() == "node-b: up"
            pid = placement["id"]
            placed = wait_for(
                lambda: (
                    (p := tb.hub.nsml("GET", f"placements/{pid}", token).json())["state"]
                    == "placed"
                    and p
                ),
                timeout=30,
                what="the waiting request placed after undrain",
            )
            assert placed["allocation"]["node"] == "node-b", placed
        finally:
            if placement is not None:
                tb.hub.nsml("DELETE", f"placements/{placement['id']}", token)
            tb.set_state("node-b", "up")
            nsml("stop", name, check=False)
    assert wait_state(nsml, name)["state"] == "stopped"
