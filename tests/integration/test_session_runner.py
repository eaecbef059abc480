"""The session runner against a real Docker engine, a real scheduler and SQLite, no hub.

A "server" here is a scheduler loop plus a runner on one database; stopping it and starting
another on the same database is a server restart. The sessions run the busybox test image.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from gpu_scheduler.policy import PlacementPolicy
from nsml_server import nodes
from nsml_server.artifacts import ArtifactStore
from nsml_server.backends import DockerBackend
from nsml_server.db import Database, check_schema
from nsml_server.lease import LeaderLease
from nsml_server.models import Allocation, TrainingSession
from nsml_server.scheduler import Scheduler
from nsml_server.schemas import Heartbeat
from nsml_server.session_runner import (
    LABEL_SERVER,
    BackendPool,
    RunnerSettings,
    SessionRunner,
)
from nsml_server.sessions import create_session
from tests.integration.test_backend_docker import busybox_image  # noqa: F401  (fixture)
from tests.integration.test_standby import fresh_database

pytestmark = [pytest.mark.docker]

NODE = "runner-node"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class World:
    db: Database
    store: ArtifactStore
    state: Path
    label: str
    prefix: str
    grace_s: float = 2.0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.db)])
def world(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    docker_client: Any,
    busybox_image: str,  # noqa: F811
) -> Iterator[World]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'nsml.sqlite'}"
    else:
        url = fresh_database(
            request.getfixturevalue("postgres_url"), f"nsml_runner_{uuid.uuid4().hex[:12]}"
        )
    db = Database(url)
    check_schema(db.engine, url)
    hb = Heartbeat.model_validate(
        {
            "backend": "docker",
            "docker_url": "unix:///var/run/docker.sock",
            "cpu_milli": 4000,
            "memory_mib": 8192,
            "gpu_probe": {"kind": "virtual", "enabled": True},
            "gpus": [
                {"index": i, "uuid": f"GPU-r-{i}", "model": "V100", "memory_total_mib": 16384}
                for i in range(2)
            ],
        }
    )
    with db.session() as s:
        nodes.apply_heartbeat(s, NODE, hb, utcnow())
    label = uuid.uuid4().hex[:16]
    w = World(db, ArtifactStore(tmp_path / "artifacts"), tmp_path, label, f"nsmltest-r{label[:8]}")
    yield w
    # sparse: no inspect of each container, which fails for one the runner removes meanwhile
    for c in docker_client.containers.list(
        all=True, sparse=True, filters={"label": f"{LABEL_SERVER}={label}"}
    ):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            c.remove(force=True, v=True)  # the runner may be removing it already
    db.dispose()


def code(store: ArtifactStore, script: str) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = script.encode()
        info = tarfile.TarInfo("job")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    path = store.tmp_dir / "upload.tar"
    path.write_bytes(buf.getvalue())
    return store.ingest_code(path, max_bytes=1 << 20, max_files=10).digest


def new_session(w: World, script: str, *, gpus: int = 1, memory_mib: int = 64) -> int:
    digest = code(w.store, script)
    with w.db.session() as s:
        row = create_session(
            s,
            user="runner-user",
            datasets=[],
            values={
                "code_digest": digest,
                "entry": "job",
                "args": [],
                "image": "nsml-test/busybox:latest",
                "resources": {
                    "gpus": gpus,
                    "gpu_milli": gpus * 1000,
                    "gpu_models": [],
                    "cpu_milli": 500,
                    "memory_mib": memory_mib,
                    "datasets": [],
                    "image": "nsml-test/busybox:latest",
                },
            },
            now=utcnow(),
        )
        return row.id


class Server:
    """A scheduler loop and a session runner sharing one database: one 'server process'."""

    def __init__(self, w: World, name: str, *, remote: bool = False) -> None:
        self.w = w
        self.stop = asyncio.Event()
        self.lease = LeaderLease(w.db, name, ttl_s=2.0, now=utcnow)
        self.scheduler = Scheduler(
            w.db, self.lease, PlacementPolicy(), now=utcnow, renew_interval_s=0.5
        )
        self.backend = DockerBackend()
        self.runner = SessionRunner(
            w.db,
            self.scheduler,
            lambda: self.lease.is_leader,
            # remote: the node is not this server's; its engine is reached at its docker_url.
            BackendPool(w.db, None, None) if remote else BackendPool(w.db, NODE, self.backend),
            w.store,
            w.state / "sessions",
            RunnerSettings(
                api_url="http://127.0.0.1:9/services/nsml/api/",
                stop_grace_s=w.grace_s,
                container_prefix=w.prefix,
                server_label=w.label,
                poll_s=0.2,
            ),
            utcnow,
        )
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self.scheduler.run(self.stop)),
            asyncio.create_task(self.runner.run(self.stop)),
        ]

    async def halt(self) -> None:
        """Stop like a server process does: the runner lets go, containers keep running."""
        self.stop.set()
        self.runner.wake()
        self.scheduler.wake()
        await asyncio.gather(*self.tasks)
        await self.backend.close()


def session(w: World, sid: int) -> TrainingSession:
    with w.db.session() as s:
        row = s.get(TrainingSession, sid)
        assert row is not None
        return row


async def until(pred: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        got = pred()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def log_text(w: World, sid: int) -> str:
    path = w.state / "sessions" / str(sid) / "output.log"
    return path.read_text() if path.exists() else ""


def test_a_session_runs_on_its_gpus_and_its_output_is_stored(world: World) -> None:
    sid = new_session(world, "#!/bin/sh\necho hello from $NSML_SESSION on $CUDA_VISIBLE_DEVICES\n")

    async def main() -> None:
        srv = Server(world, "a")
        srv.start()
        await until(lambda: session(world, sid).state == "completed", what="completed")
        await srv.halt()

    run(main())
    row = session(world, sid)
    assert row.exit_code == 0 and row.node == NODE and len(row.gpu_ids) == 1
    assert row.token_hash is None, "the session token is revoked at the end"
    text = log_text(world, sid)
    assert "hello from runner-user/_/1 on 0\n" in text, text
    with world.db.session() as s:
        alloc = s.query(Allocation).one()
        assert alloc.state == "released"


def test_on_a_remote_node_the_code_is_copied_in_not_mounted(world: World) -> None:
    sid = new_session(
        world,
        "#!/bin/sh\necho code at $(pwd): $(ls)\necho mounted: $(grep -c ' /nsml/code ' "
        "/proc/mounts)\necho edited > notes.txt && echo writable\n",
    )

    async def main() -> None:
        srv = Server(world, "a", remote=True)
        srv.start()
        await until(lambda: session(world, sid).state == "completed", what="completed")
        await srv.halt()

    run(main())
    text = log_text(world, sid)
    assert "code at /nsml/code: job" in text and "mounted: 0" in text, text
    assert "writable" in text, text


def test_a_restarted_server_follows_a_running_container_and_keeps_its_log_whole(
    world: World,
) -> None:
    script = "#!/bin/sh\nfor i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.5; done\nexit 3\n"
    sid = new_session(world, script)

    async def main() -> None:
        first = Server(world, "first")
        first.start()
        await until(lambda: "line 2" in log_text(world, sid), what="output before the restart")
        await first.halt()
        assert session(world, sid).state == "running"
        await asyncio.sleep(1.0)  # the container writes while no server follows it
        second = Server(world, "second")
        second.start()
        await until(lambda: session(world, sid).state == "failed", 60, "the end")
        await second.halt()

    run(main())
    row = session(world, sid)
    assert row.exit_code == 3 and row.reason == "exit_code"
    lines = [ln for ln in log_text(world, sid).splitlines() if ln.startswith("line")]
    assert lines == [f"line {i}" for i in range(1, 9)], lines


def test_a_container_that_vanished_while_no_server_followed_it_is_lost(
    world: World, docker_client: Any
) -> None:
    sid = new_session(world, "#!/bin/sh\necho started\nsleep 60\n")

    async def main() -> None:
        first = Server(world, "first")
        first.start()
        await until(lambda: session(world, sid).state == "running", what="running")
        await first.halt()
        docker_client.containers.get(session(world, sid).handle).remove(force=True)
        second = Server(world, "second")
        second.start()
        await until(lambda: session(world, sid).state == "lost", 30, "lost")
        await second.halt()

    run(main())
    row = session(world, sid)
    assert "vanished" in (row.message or "")
    with world.db.session() as s:
        assert s.query(Allocation).one().state == "released"


def test_stop_sends_sigterm_and_kills_after_the_grace_period(world: World) -> None:
    polite = new_session(
        world,
        "#!/bin/sh\ntrap 'echo got TERM; sleep 0.3; echo saved; exit 0' TERM\n"
        "echo ready\nwhile true; do sleep 0.1; done\n",
    )
    stubborn = new_session(
        world,
        "#!/bin/sh\ntrap 'echo ignoring TERM' TERM\necho ready\nwhile true; do sleep 0.1; done\n",
    )

    async def main() -> None:
        srv = Server(world, "a")
        srv.start()
        for sid in (polite, stubborn):
            await until(lambda sid=sid: "ready" in log_text(world, sid), what="ready")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with world.db.session() as s:
            for sid in (polite, stubborn):
                s.get(TrainingSession, sid).stop_requested = True  # type: ignore[union-attr]
        srv.runner.wake()
        await until(lambda: session(world, polite).state == "stopped", 30, "polite stopped")
        polite_s = loop.time() - t0
        await until(lambda: session(world, stubborn).state == "stopped", 30, "stubborn stopped")
        stubborn_s = loop.time() - t0
        await srv.halt()
        assert polite_s < world.grace_s, polite_s
        assert stubborn_s >= world.grace_s, stubborn_s

    run(main())
    assert "got TERM" in log_text(world, polite) and "saved" in log_text(world, polite)
    assert session(world, polite).exit_code == 0
    assert "ignoring TERM" in log_text(world, stubborn)
    assert session(world, stubborn).exit_code == 137


def test_a_session_that_can_never_fit_fails_with_the_reason(world: World) -> None:
    sid = new_session(world, "#!/bin/sh\necho never\n", gpus=8)

    async def main() -> None:
        srv = Server(world, "a")
        srv.start()
        await until(lambda: session(world, sid).state == "failed", what="failed")
        await srv.halt()

    run(main())
    row = session(world, sid)
    assert row.reason == "infeasible" and "gpu" in (row.message or "").lower(), row.message


def test_a_missing_image_fails_the_start_with_what_to_do(world: World) -> None:
    sid = new_session(world, "#!/bin/sh\necho x\n")
    with world.db.session() as s:
        s.get(TrainingSession, sid).image = "nsml-test/no-such-image:1"  # type: ignore[union-attr]

    async def main() -> None:
        srv = Server(world, "a")
        srv.start()
        await until(lambda: session(world, sid).state == "failed", what="failed")
        await srv.halt()

    run(main())
    row = session(world, sid)
    assert row.reason == "image_not_found" and "never pulled" in (row.message or "")
    with world.db.session() as s:
        assert s.query(Allocation).one().state == "released"
