"""A lost node, against real parts: two Docker engines (the default one as node-a, a second
one started here as node-b), PostgreSQL, the real scheduler loop and session runner, and the
nodes' heartbeats. node-b's dockerd is killed mid-session (SIGKILL) and its heartbeats stop:
the node turns down, its sessions end lost or are requeued on node-a from their last
checkpoint, its notebook allocation is released, each GPU exactly once, and new work goes to
node-a; when node-b comes back its orphan containers are swept (only this deployment's), and
only then does it take work again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import docker.errors
import pytest
import requests
from sqlalchemy import select

from gpu_scheduler.policy import PlacementPolicy
from nsml_server import ledger, nodes
from nsml_server.artifacts import ArtifactStore
from nsml_server.db import Database, check_schema
from nsml_server.lease import LeaderLease
from nsml_server.models import Allocation, Gpu, Node, SessionEvent, TrainingSession
from nsml_server.node_loss import LABEL_ALLOCATION, release_lost_allocations
from nsml_server.scheduler import Scheduler
from nsml_server.schemas import Heartbeat
from nsml_server.session_runner import LABEL_SERVER, BackendPool, RunnerSettings, SessionRunner
from nsml_server.sessions import create_session, record_checkpoint
from tests.integration.test_backend_docker import (
    APPLETS,
    BUSYBOX,
    IMAGE,
    _image_tar,
    busybox_image,  # noqa: F401  (fixture)
)
from tests.integration.test_session_runner import code, until, utcnow
from tests.integration.test_standby import fresh_database, ledger_is_consistent

pytestmark = [pytest.mark.docker, pytest.mark.db]

ROOT = Path(__file__).resolve().parents[2]
ENGINE_SCRIPT = ROOT / "scripts" / "docker-engine.sh"
TIMEOUT_S, GRACE_S = 2.0, 3.0
SCRIPT = (
    "#!/bin/sh\necho attempt $NSML_ATTEMPT on $NSML_NODE loading ${NSML_LOAD_FROM:-nothing}\n"
    "sleep 300\n"
)


@dataclass
class SecondEngine:
    """A Docker engine of its own (scripts/docker-engine.sh ensure --name), as a node."""

    name: str
    state: Path
    host: str = ""

    def ensure(self) -> None:
        out = subprocess.run(
            [str(ENGINE_SCRIPT), "ensure", "--name", self.name, "--state-dir", str(self.state)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            pytest.skip(f"docker: cannot start a second engine: {out.stderr.strip()[-500:]}")
        self.host = out.stdout.strip().split("=", 1)[1]

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=30)

    def kill(self) -> None:
        """SIGKILL its dockerd, as a crash does."""
        pid = int((self.state / self.name / "dockerd.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def stop(self) -> None:
        subprocess.run(
            [str(ENGINE_SCRIPT), "stop", "--name", self.name, "--state-dir", str(self.state)],
            capture_output=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture
def node_b() -> Iterator[SecondEngine]:
    # A short folder: a unix socket path must stay under 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="nsml-lost-", dir="/tmp"))
    engine = SecondEngine(f"lost-{uuid.uuid4().hex[:6]}", state)
    try:
        engine.ensure()
        client = engine.client()
        client.api.import_image_from_data(
            _image_tar(BUSYBOX.read_bytes()),
            repository=IMAGE.rsplit(":", 1)[0],
            tag=IMAGE.rsplit(":", 1)[1],
            changes=["ENV PATH=/bin", 'CMD ["/bin/sh"]'],
        )
        client.close()
        assert APPLETS
        yield engine
    finally:
        engine.stop()
        shutil.rmtree(state, ignore_errors=True)


def heartbeat(url: str) -> Heartbeat:
    return Heartbeat.model_validate(
        {
            "backend": "docker",
            "docker_url": url,
            "cpu_milli": 4000,
            "memory_mib": 8192,
            "gpu_probe": {"kind": "virtual", "enabled": True},
            "gpus": [
                {
                    "index": i,
                    "uuid": f"GPU-{url[-12:]}-{i}",
                    "model": "V100",
                    "memory_total_mib": 16384,
                }
                for i in range(2)
            ],
        }
    )


class Cluster:
    """One NSML server (scheduler loop, session runner, node check) and two nodes' agents
    (heartbeats), on one database."""

    def __init__(self, db: Database, store: ArtifactStore, state: Path, label: str, b: str):
        self.db, self.label = db, label
        self.stop = asyncio.Event()
        self.b_alive = asyncio.Event()
        self.b_alive.set()
        self.urls = {"node-a": "unix:///var/run/docker.sock", "node-b": b}
        self.lease = LeaderLease(db, "lost-server", ttl_s=2.0, now=utcnow)
        self.scheduler = Scheduler(db, self.lease, PlacementPolicy(), now=utcnow)
        self.runner = SessionRunner(
            db,
            self.scheduler,
            lambda: self.lease.is_leader,
            BackendPool(db, None, None),  # every node's engine at the URL its agent reports
            store,
            state / "sessions",
            RunnerSettings(
                api_url="http://127.0.0.1:9/services/nsml/api/",
                stop_grace_s=1,
                container_prefix=f"nsmltest-lost{label[:6]}",
                server_label=label,
                poll_s=0.2,
                node_timeout_s=TIMEOUT_S,
                node_lost_grace_s=GRACE_S,
                unreachable_retry_s=0.5,
                engine_check_s=1.0,
            ),
            utcnow,
        )
        self.tasks: list[asyncio.Task[None]] = []

    def beat(self) -> None:
        with self.db.session() as s:
            for name, url in self.urls.items():
                if name == "node-a" or self.b_alive.is_set():
                    nodes.apply_heartbeat(s, name, heartbeat(url), utcnow())

    async def agents(self) -> None:
        while not self.stop.is_set():
            self.beat()
            await asyncio.sleep(0.3)

    async def node_check(self) -> None:  # NSMLServer.check_nodes
        while not self.stop.is_set():
            with self.db.session() as s:
                nodes.mark_silent_nodes_down(s, utcnow(), timedelta(seconds=TIMEOUT_S))
            if self.lease.is_leader:
                with self.db.session() as s:
                    release_lost_allocations(s, self.scheduler, utcnow(), TIMEOUT_S, GRACE_S)
            await asyncio.sleep(0.3)

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self.agents()),
            asyncio.create_task(self.node_check()),
            asyncio.create_task(self.scheduler.run(self.stop)),
            asyncio.create_task(self.runner.run(self.stop)),
        ]

    async def halt(self) -> None:
        self.stop.set()
        self.runner.wake()
        self.scheduler.wake()
        await asyncio.gather(*self.tasks)
        await self.runner.backends.close()


def new_session(db: Database, store: ArtifactStore, *, restart: bool) -> int:
    with db.session() as s:
        row = create_session(
            s,
            user="lost-user",
            datasets=[],
            values={
                "code_digest": code(store, SCRIPT),
                "entry": "job",
                "args": [],
                "image": IMAGE,
                "restart_on_lost": restart,
                "resources": {
                    "gpus": 1,
                    "gpu_milli": 1000,
                    "gpu_models": [],
                    "cpu_milli": 500,
                    "memory_mib": 64,
                    "datasets": [],
                    "image": IMAGE,
                },
            },
            now=utcnow(),
        )
        return row.id


def get(db: Database, sid: int) -> TrainingSession:
    with db.session() as s:
        row = s.get(TrainingSession, sid)
        assert row is not None
        return row


def node_row(db: Database, name: str) -> Node:
    with db.session() as s:
        row = s.scalar(select(Node).where(Node.name == name))
        assert row is not None
        return row


def events(db: Database, sid: int) -> list[str]:
    with db.session() as s:
        return list(
            s.scalars(
                select(SessionEvent.message)
                .where(SessionEvent.session_id == sid)
                .order_by(SessionEvent.id)
            )
        )


def labelled(client: docker.DockerClient, label: str) -> set[str]:
    return {
        c.id for c in client.containers.list(all=True, filters={"label": f"{LABEL_SERVER}={label}"})
    }


def test_a_killed_engine_loses_its_node_and_the_work_moves_on_once(
    tmp_path: Path,
    postgres_url: str,
    docker_client: Any,
    busybox_image: str,  # noqa: F811
    node_b: SecondEngine,
) -> None:
    url = fresh_database(postgres_url, f"nsml_lost_{uuid.uuid4().hex[:12]}")
    db = Database(url)
    check_schema(db.engine, url)
    store = ArtifactStore(tmp_path / "artifacts")
    label = uuid.uuid4().hex[:16]
    cluster = Cluster(db, store, tmp_path, label, node_b.host)
    cluster.beat()
    with db.session() as s:  # node-a is drained: the first work lands on node-b
        s.execute(Node.__table__.update().where(Node.name == "node-a").values(state="draining"))
    plain = new_session(db, store, restart=False)
    restart = new_session(db, store, restart=True)
    # A notebook server on node-b (what NSMLSpawner creates), and a container that is not
    # this deployment's: the sweep must leave the second alone.
    with db.session() as s:
        nb_alloc = ledger.reserve(
            s,
            holder="lost-user:notebook",
            user_name="lost-user",
            node_name="node-b",
            gpu_indices=[],
            gpu_milli_per_gpu=0,
            cpu_milli=500,
            memory_mib=64,
            now=utcnow(),
        ).id
    b = node_b.client()
    notebook = b.containers.run(
        IMAGE,
        ["sleep", "300"],
        detach=True,
        network_mode="none",
        labels={LABEL_SERVER: label, LABEL_ALLOCATION: str(nb_alloc)},
    )
    foreign = b.containers.run(
        IMAGE,
        ["sleep", "300"],
        detach=True,
        network_mode="none",
        labels={LABEL_SERVER: "another-deployment", LABEL_ALLOCATION: str(nb_alloc)},
    )
    b.close()
    seen: dict[str, Any] = {}

    async def main() -> None:
        cluster.start()
        for sid in (plain, restart):
            await until(lambda sid=sid: get(db, sid).state == "running", 60, "running on B")
        assert {get(db, plain).node, get(db, restart).node} == {"node-b"}
        with db.session() as s:  # the training code saved checkpoint 7 (nsml.save)
            record_checkpoint(s, get(db, restart), "7", "0" * 64, 10, 7, utcnow())
            s.execute(Node.__table__.update().where(Node.name == "node-a").values(state="up"))
        cluster.b_alive.clear()  # the node's agent dies with its engine
        node_b.kill()
        await until(lambda: node_row(db, "node-b").state == "down", 30, "node-b down")
        # Late, not gone: its sessions still run as far as anyone knows.
        seen["while_down"] = (get(db, plain).state, get(db, restart).state)
        await until(lambda: get(db, plain).state == "lost", 60, "lost")
        await until(
            lambda: get(db, restart).attempt == 2 and get(db, restart).state == "running",
            60,
            "requeued and running on node-a",
        )
        later = new_session(db, store, restart=False)
        await until(lambda: get(db, later).state == "running", 60, "new work running")
        seen["later"] = get(db, later).node
        seen["fenced"] = node_row(db, "node-b").needs_sweep
        ledger_is_consistent(url)  # every GPU counter equals what active allocations hold
        with db.session() as s:
            seen["b_gpus"] = list(
                s.scalars(
                    select(Gpu.allocated_milli)
                    .join(Node, Node.id == Gpu.node_id)
                    .where(Node.name == "node-b")
                )
            )
            seen["b_active"] = s.scalar(
                select(Node.cpu_allocated_milli).where(Node.name == "node-b")
            )
            seen["nb_alloc"] = s.get(Allocation, nb_alloc).state  # type: ignore[union-attr]
        # node-b comes back: engine and agent. The runner sweeps, then it takes work again.
        node_b.ensure()
        cluster.b_alive.set()
        await until(lambda: not node_row(db, "node-b").needs_sweep, 60, "node-b swept")
        last = new_session(db, store, restart=False)  # node-a is full now (2 GPUs)
        await until(lambda: get(db, last).state == "running", 60, "work on node-b again")
        seen["last"] = get(db, last).node
        seen["last_handle"] = get(db, last).handle
        await cluster.halt()

    try:
        asyncio.run(main())
        assert seen["while_down"] == ("running", "running"), seen
        row = get(db, plain)
        assert row.reason == "node_lost" and "node-b" in (row.message or "")
        assert f"nsml resume {row.name}" in (row.message or "")
        assert any("node node-b does not answer" in e for e in events(db, plain))
        req = get(db, restart)
        assert (req.node, req.load_from) == ("node-a", f"{req.name}/7")
        assert any(
            e.startswith("node node-b lost (")
            and e.endswith("; session requeued as attempt 2 from checkpoint 7")
            for e in events(db, restart)
        ), events(db, restart)
        log = (tmp_path / "sessions" / str(restart) / "output.log").read_text()
        assert f"attempt 2 on node-a loading {req.name}/7" in log, log
        assert seen["later"] == "node-a" and seen["fenced"] is True
        assert seen["b_gpus"] == [0, 0] and seen["b_active"] == 0, "released, exactly once"
        assert seen["nb_alloc"] == "released"
        assert seen["last"] == "node-b"
        b = node_b.client()
        # The lost attempts' containers and the notebook server's are gone; the new
        # session's runs; the other deployment's container is untouched.
        assert labelled(b, label) == {seen["last_handle"]}, (notebook.id, labelled(b, label))
        assert foreign.id in {c.id for c in b.containers.list(all=True)}, "not ours: kept"
        b.close()
        ledger_is_consistent(url)
    finally:
        with contextlib.suppress(Exception):
            for c in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_SERVER}={label}"}
            ):
                with contextlib.suppress(docker.errors.APIError):
                    c.remove(force=True, v=True)
        db.dispose()


# ---- the hub is told: NSMLSpawner.poll of a notebook server on a lost node ---------------------


@pytest.mark.hub
def test_a_notebook_server_on_a_lost_node_is_reported_stopped_and_released_once(
    hub: Any, postgres_url: str, tmp_path: Path
) -> None:
    """A real NSML server (PostgreSQL, the hub's auth) with short node settings, a node whose
    engine never answers (its socket is absent) and NSMLSpawner's poll, as the hub calls it."""
    from traitlets.config import Config

    from nsml_spawner.spawner import NSMLSpawner
    from nsml_spawner.spec import Allocation as NotebookAllocation
    from tests.integration.hubproc import ServerProcess, virtual_node_heartbeat

    db_url = fresh_database(postgres_url, f"nsml_lostnb_{uuid.uuid4().hex[:12]}")
    srv = ServerProcess(
        hub,
        db_url,
        "lost-nb",
        args=[
            "--NSMLServer.node_timeout=2",
            "--NSMLServer.node_lost_grace=2",
            "--NSMLServer.heartbeat_interval=0.3",
        ],
    )
    admin = hub.user_token("admin")
    auth = {"Authorization": f"token {admin}"}
    engine = f"unix://{tmp_path}/absent.sock"  # an engine that does not answer
    body = {**virtual_node_heartbeat("nb-node", gpus=2), "docker_url": engine}

    def beat() -> None:
        r = requests.put(f"{srv.api}/nodes/nb-node/heartbeat", json=body, headers=auth, timeout=10)
        assert r.status_code == 200, r.text

    def node() -> dict[str, Any]:
        return dict(requests.get(f"{srv.api}/nodes/nb-node", headers=auth, timeout=10).json())

    def place(server: str) -> NotebookAllocation:
        r = requests.post(
            f"{srv.api}/placements",
            json={"holder": f"notebook:{server}", "user": "lostnb", "gpus": 1, "wait_s": 10},
            headers=auth,
            timeout=30,
        )
        assert r.status_code in (200, 201), r.text
        assert r.json()["state"] == "placed", r.json()
        return NotebookAllocation.from_placement(r.json())

    def spawner(alloc: NotebookAllocation) -> Any:
        cfg = Config()
        cfg.NSMLSpawner.scheduler_url = srv.api + "/"
        cfg.NSMLSpawner.scheduler_token = admin
        sp = NSMLSpawner(config=cfg, user=SimpleNamespace(name="lostnb", url="/user/lostnb/"))
        sp.allocation, sp.engine_url = alloc, engine
        return sp

    def placement(pid: int) -> dict[str, Any]:
        return dict(requests.get(f"{srv.api}/placements/{pid}", headers=auth, timeout=10).json())

    srv.start()
    try:
        stop_beating = threading.Event()

        def agent() -> None:
            while not stop_beating.wait(0.3):
                beat()

        beat()
        first, second = place("one"), place("two")
        thread = threading.Thread(target=agent, daemon=True)
        thread.start()
        out: dict[str, Any] = {}

        async def polls() -> None:
            a, b = spawner(first), spawner(second)
            NSMLSpawner._api = None  # a client of this server, on this event loop
            out["alive"] = await a.poll()  # the engine is silent but the node heartbeats
            stop_beating.set()  # the agent dies with its engine
            thread.join()
            await asyncio.to_thread(wait_until, lambda: node()["state"] == "down", "down")
            out["down"] = await a.poll()
            out["down_exit"] = a.last_exit
            # The other server is not polled until its node is gone: the NSML server
            # released it by then (its node check), and the poll says so.
            await asyncio.to_thread(
                wait_until, lambda: placement(second.placement_id)["state"] == "released", "gone"
            )
            out["gone"] = await b.poll()
            out["gone_exit"] = b.last_exit

        asyncio.run(polls())
        assert out["alive"] is None, "a silent engine alone proves nothing"
        assert out["down"] == 1 and out["down_exit"].reason == "node_lost"
        assert "node nb-node was lost (no heartbeat" in out["down_exit"].message
        assert out["gone"] == 1 and "the NSML server released" in out["gone_exit"].message
        for alloc in (first, second):
            p = placement(alloc.placement_id)
            assert p["state"] == "released" and p["allocation"]["state"] == "released"
        n = node()
        assert [g["allocated_milli"] for g in n["gpus"]] == [0, 0], "each GPU released once"
        assert n["needs_sweep"] is True, "released while down: fenced until swept"
    finally:
        srv.stop()


def wait_until(pred: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
