"""THE lost-node test, on the test bed: a real hub, PostgreSQL, node-a (the hub's engine) and
node-b (an engine of its own over TCP+TLS, with its ``nsml-agent``).

node-b's dockerd is killed (SIGKILL) while a notebook server and two sessions run on it. The
agent, whose engine no longer answers, stops heartbeating; the node turns ``down``; its plain
session ends ``lost``, its ``--restart-on-lost`` session is requeued on node-a and loads its
last checkpoint; the hub is told the notebook server stopped; every GPU is released exactly
once; later work goes to node-a. When node-b's engine comes back, the orphan containers are
swept from it and it takes work again.

Its own cluster (short node timeouts), not the session's test bed: those settings would make
the other tests' nodes flap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.testbed import Testbed, TestbedUnavailable, cluster, why_unavailable
from tests.integration.conftest import wait_for

NSML = str(Path(sys.executable).parent / "nsml")
MODEL = "LOSS-V100"
TIMEOUT_S, GRACE_S = 4, 6

TRAIN_PY = """
import os, time
import nsml
state = {"attempt": os.environ["NSML_ATTEMPT"], "node": os.environ["NSML_NODE"]}
def save(folder):
    with open(os.path.join(folder, "state.txt"), "w") as f:
        f.write(f"saved by attempt {state['attempt']} on {state['node']}")
def load(folder):
    with open(os.path.join(folder, "state.txt")) as f:
        print("loaded:", f.read(), flush=True)
nsml.bind(save=save, load=load)
print("attempt", state["attempt"], "on", state["node"], flush=True)
if state["attempt"] == "1":
    nsml.save(7)
    print("saved checkpoint 7", flush=True)
time.sleep(900)
"""


@pytest.fixture(scope="module")
def bed(singleuser_image: str, postgres_url: str, docker_client: Any) -> Iterator[Testbed]:
    from tests.conftest import service_missing

    why = why_unavailable()
    if why:
        service_missing("cluster", why)
    try:
        cm = cluster(
            2,
            image=singleuser_image,
            db_url=postgres_url,
            gpus_per_node=2,
            gpu_model=MODEL,
            server_args=[
                f"--NSMLServer.node_timeout={TIMEOUT_S}",
                f"--NSMLServer.node_lost_grace={GRACE_S}",
            ],  # the test bed checks for silent nodes every 2 s (heartbeat_interval)
            agent_interval=0.5,
        )
        tb = cm.__enter__()
    except TestbedUnavailable as e:
        service_missing("cluster", str(e))
        raise
    try:
        yield tb
    finally:
        cm.__exit__(None, None, None)


Cli = Callable[..., Any]


def cli(tb: Testbed, token: str, cwd: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    env.update(NSML_API_URL=tb.hub.nsml_api + "/", NSML_TOKEN=token)

    def nsml(*args: str) -> str:
        r = subprocess.run(
            [NSML, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, f"nsml {' '.join(args)} -> {r.returncode}\n{r.stderr}"
        return r.stdout

    return nsml


def status(nsml: Cli, name: str) -> dict[str, Any]:
    return dict(json.loads(nsml("status", name, "--json")))


def events(tb: Testbed, token: str, name: str) -> list[str]:
    r = tb.hub.nsml("GET", f"sessions/{name}/events", token)
    assert r.status_code == 200, r.text
    return [e["message"] for e in r.json()["events"]]


def gpus_held(tb: Testbed, node: str) -> list[int]:
    return [g["allocated_milli"] for g in tb.node(node)["gpus"]]


def server_model(tb: Testbed, user: str) -> dict[str, Any]:
    return dict(tb.hub.admin("GET", f"/users/{user}").json())


def kill_engine(tb: Testbed, node: str) -> None:
    """SIGKILL the node's dockerd, as a crash does (its agent keeps running)."""
    e = tb.engines[node]
    assert e.slots_dir is not None and e.slot is not None
    pid = int((e.slots_dir / e.slot / "dockerd.pid").read_text().strip())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=30, what="dockerd gone")


def test_an_engine_killed_mid_session_loses_its_node_and_the_work_moves_on_once(
    bed: Testbed, tmp_path: Path
) -> None:
    tb = bed
    admin = tb.admin_token
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN_PY)
    token = tb.hub.user_token("loss-bob")
    nsml = cli(tb, token, project)

    # node-a drained: the first work lands on node-b.
    r = tb.hub.nsml("PATCH", "nodes/node-a", admin, json={"state": "draining"})
    assert r.status_code == 200, r.text
    tb.hub.user_token("loss-alice")
    r = tb.hub.admin(
        "POST",
        "/users/loss-alice/server",
        json={"user_options": {"gpus": 1, "gpu_model": MODEL, "cpu": 0.5, "memory": "512M"}},
    )
    assert r.status_code in (201, 202), f"{r.text}\n{tb.logs(80)}"
    wait_for(
        lambda: server_model(tb, "loss-alice").get("servers", {}).get("", {}).get("ready"),
        timeout=120,
        what="alice's server ready",
    )
    assert [c.labels["nsml.user"] for c in tb.containers("node-b")] == ["loss-alice"]
    # Sessions ask little CPU: a node of the test bed has this machine's 2 cores.
    plain = nsml("run", "--gpus", "0.5", "--cpu", "0.25", "--memory", "256M", "train.py").strip()
    again = nsml(
        "run", "--restart-on-lost", "--gpus", "0.5", "--cpu", "0.25", "--memory", "256M", "train.py"
    ).strip()
    for name in (plain, again):
        wait_for(
            lambda n=name: status(nsml, n)["state"] == "running", timeout=120, what=f"{name} runs"
        )
    assert {status(nsml, plain)["node"], status(nsml, again)["node"]} == {"node-b"}
    wait_for(lambda: "saved checkpoint 7" in nsml("logs", again), timeout=120, what="checkpoint 7")
    held_before = gpus_held(tb, "node-b")
    assert sum(held_before) == 2000, held_before  # alice's GPU and two halves
    r = tb.hub.nsml("PATCH", "nodes/node-a", admin, json={"state": "up"})
    assert r.status_code == 200, r.text

    kill_engine(tb, "node-b")
    try:
        lose_and_return(tb, nsml, token, plain, again)
    finally:
        if not tb.engines["node-b"].answers():  # leave the test bed whole
            tb.engines["node-b"].start()


def lose_and_return(tb: Testbed, nsml: Cli, token: str, plain: str, again: str) -> None:
    """From node-b's engine killed to node-b taking work again."""
    admin = tb.admin_token
    wait_for(lambda: tb.node("node-b")["state"] == "down", timeout=60, what="node-b down")
    late = (status(nsml, plain)["state"], status(nsml, again)["state"])

    st = wait_for(
        lambda: (s := status(nsml, plain))["state"] == "lost" and s, timeout=120, what="lost"
    )
    requeued = wait_for(
        lambda: (s := status(nsml, again))["state"] == "running" and s["attempt"] == 2 and s,
        timeout=180,
        what="requeued and running",
    )
    wait_for(
        lambda: not server_model(tb, "loss-alice").get("servers"),
        timeout=90,
        what="the hub told: alice's server stopped",
    )
    assert late == ("running", "running"), "late, not gone: nothing given up yet"
    assert st["reason"] == "node_lost" and f"nsml resume {plain}" in st["message"], st
    assert requeued["node"] == "node-a" and requeued["load_from"] == f"{again}/7", requeued
    try:
        wait_for(lambda: "loaded:" in nsml("logs", again), timeout=120, what="checkpoint loaded")
    except AssertionError as e:
        engine_logs = [
            (c.name, c.status, c.logs(tail=50).decode(errors="replace"))
            for c in tb.containers("node-a", all=True)
        ]
        raise AssertionError(
            f"{e}\n{nsml('logs', again)}\n{status(nsml, again)}\n{engine_logs}\n{tb.logs(60)}"
        ) from None
    out = nsml("logs", again)
    assert "loaded: saved by attempt 1 on node-b" in out and "attempt 2 on node-a" in out, out
    assert any(
        e.startswith("node node-b lost (")
        and e.endswith("; session requeued as attempt 2 from checkpoint 7")
        for e in events(tb, token, again)
    ), events(tb, token, again)
    # docker ps on node-a shows the second attempt's container (PREFIX-session-ID-ATTEMPT).
    assert any(c.name.endswith(f"-{requeued['id']}-2") for c in tb.containers("node-a"))

    # Every GPU of node-b released exactly once (a counter never goes below zero; one release
    # per allocation); the ledger holds only what runs on node-a.
    assert gpus_held(tb, "node-b") == [0, 0]
    mine = tb.hub.nsml("GET", "placements?all=1", admin).json()["placements"]
    on_b = [p for p in mine if p["allocation"] and p["allocation"]["node"] == "node-b"]
    assert len(on_b) == 3 and all(p["allocation"]["state"] == "released" for p in on_b), on_b
    assert tb.node("node-b")["needs_sweep"] is True

    # Later work goes to node-a, and alice starts her server again: on node-a.
    later = nsml("run", "--cpu", "0.25", "--memory", "256M", "train.py").strip()
    assert (
        wait_for(
            lambda: (s := status(nsml, later))["state"] == "running" and s,
            timeout=120,
            what="later",
        )["node"]
        == "node-a"
    )
    r = tb.hub.admin(
        "POST",
        "/users/loss-alice/server",
        json={"user_options": {"gpus": 1, "gpu_model": MODEL, "cpu": 0.5, "memory": "512M"}},
    )
    assert r.status_code in (201, 202), r.text
    wait_for(
        lambda: server_model(tb, "loss-alice").get("servers", {}).get("", {}).get("ready"),
        timeout=120,
        what="alice's server ready again",
    )
    assert "loss-alice" in [c.labels.get("nsml.user") for c in tb.containers("node-a")]

    # node-b comes back: its engine (the agent heartbeats again), the sweep, then new work.
    tb.engines["node-b"].start()
    wait_for(lambda: tb.node("node-b")["state"] == "up", timeout=60, what="node-b up")
    wait_for(lambda: not tb.node("node-b")["needs_sweep"], timeout=60, what="node-b swept")
    assert tb.containers("node-b", all=True) == [], [c.name for c in tb.containers("node-b")]
    last = nsml("run", "--gpus", "1", "--cpu", "0.25", "--memory", "256M", "train.py").strip()
    assert (
        wait_for(
            lambda: (s := status(nsml, last))["state"] == "running" and s, timeout=120, what="last"
        )["node"]
        == "node-b"
    ), "node-a has no whole GPU left; node-b takes work again"
    for name in (again, later, last):
        nsml("stop", name)
