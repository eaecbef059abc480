"""Evaluations stop at zero credits as sessions do, under an injected clock: billing charges
the evaluation's allocation every interval; at zero it asks for a stop (reason ``credits``);
the evaluation runner sends SIGTERM, waits the grace, ends it ``stopped`` and releases its
GPUs. A real database, the real scheduler, a real process (the local backend)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from gpu_scheduler.policy import PlacementPolicy
from nsml_server import credits, nodes
from nsml_server.backends import LocalProcessBackend, RunSpec, RunState
from nsml_server.billing import CreditBilling, enforce
from nsml_server.credits import Policy
from nsml_server.db import Database, check_schema
from nsml_server.evaluations import EvaluationRunner, EvaluationSettings
from nsml_server.lease import LeaderLease
from nsml_server.models import (
    Allocation,
    Dataset,
    PlacementRequestRow,
    Submission,
    User,
)
from nsml_server.scheduler import Scheduler
from nsml_server.scheduler import Submission as Ask
from nsml_server.schemas import Heartbeat
from nsml_server.session_runner import BackendPool
from tests.unit.rows import hold

T0 = datetime(2026, 12, 1, 9, 0, 0)
#: One credit per GPU-minute; nothing else costs.
POLICY = Policy(gpu_hour_milli=60_000, cpu_hour_milli=0, memory_gb_hour_milli=0, interval_s=60)

TRAPS_SIGTERM = """
import pathlib, signal, sys, time
def term(*_):
    pathlib.Path(sys.argv[1]).write_text("sigterm")
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'nsml.sqlite'}"
    database = Database(url)
    check_schema(database.engine, url)
    beat = Heartbeat.model_validate(
        {
            "backend": "local",
            "cpu_milli": 8000,
            "memory_mib": 32768,
            "gpu_probe": {"kind": "virtual", "enabled": True},
            "gpus": [{"index": 0, "uuid": "GPU-0", "model": "V100", "memory_total_mib": 16384}],
        }
    )
    with database.session() as s:
        nodes.apply_heartbeat(s, "node-a", beat, T0)
        credits.set_policy(s, POLICY, "root", T0 - timedelta(days=1))
        credits.ensure_user(s, "alice", T0 - timedelta(days=1), 2_500)  # 2.5 GPU-minutes
        s.add(Dataset(name="mnist", owner="olga", created=T0))
    yield database
    database.dispose()


@pytest.fixture()
def backend(tmp_path: Path) -> Iterator[LocalProcessBackend]:
    """The local backend; whatever a test left running is killed afterwards."""
    b = LocalProcessBackend(tmp_path / "runs")
    started: list[str] = []
    start = b.start

    async def remember(spec: RunSpec) -> str:
        handle = await start(spec)
        started.append(handle)
        return handle

    b.start = remember  # type: ignore[method-assign]
    yield b
    for handle in started:
        asyncio.run(b.stop(handle, grace_s=0))


def test_an_evaluation_out_of_credits_gets_sigterm_ends_stopped_and_frees_its_gpu(
    db: Database, backend: LocalProcessBackend, tmp_path: Path
) -> None:
    clock = Clock(T0)
    lease = LeaderLease(db, "s1", ttl_s=3, now=clock)
    lease.tick()
    sched = Scheduler(db, lease, PlacementPolicy(), now=clock)
    with db.session() as s:
        ds = s.scalar(select(Dataset))
        assert ds is not None
        sub = Submission(
            dataset_id=ds.id,
            dataset_ref="mnist@1",
            test_digest="0" * 64,
            user_name="alice",
            session_name="alice/mnist/1",
            checkpoint="1",
            checkpoint_sha256="0" * 64,
            code_digest="0" * 64,
            entry="main.py",
            image="img",
            resources={"gpu_milli": 1000, "cpu_milli": 1000, "memory_mib": 512},
            state="running",
            submitted=T0,
        )
        s.add(sub)
        s.flush()
        sid = sub.id
        spec = {"gpu_milli": 1000, "cpu_milli": 1000, "memory_mib": 512}
        ((rid, _, _),) = sched.submit_many(s, [Ask("alice", f"alice:evaluation/{sid}", spec)])
    sched.run_pass()
    marker = tmp_path / "got-sigterm"
    handle = asyncio.run(
        backend.start(
            RunSpec(
                name=f"eval-{sid}",
                image="ignored",
                command=[sys.executable, "-c", TRAPS_SIGTERM, str(marker)],
            )
        )
    )

    async def ready() -> None:  # its SIGTERM handler is in place
        for _ in range(200):
            if "ready" in await backend.logs(handle):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the evaluation program never started")

    asyncio.run(ready())
    with db.session() as s:
        p = s.get(PlacementRequestRow, rid)
        assert p is not None and p.state == "placed"
        row = s.get(Submission, sid)
        assert row is not None
        row.placement_id, row.node, row.handle, row.started = rid, "node-a", handle, T0

    # Billing, minute after minute: 1 credit a minute against 2.5 credits.
    billing = CreditBilling(db, now=clock)
    stopped_at = None
    for minute in range(1, 6):
        clock.t = T0 + timedelta(minutes=minute, seconds=1)
        _, decided = billing.tick()
        if decided.stopped_evaluations:
            assert decided.stopped_evaluations == [sid]
            stopped_at = minute
            break
    assert stopped_at == 3  # the third minute's charge took the balance below zero
    with db.session() as s:
        row = s.get(Submission, sid)
        assert row is not None and (row.state, row.stop_reason) == ("running", "credits")
        balance = s.scalar(select(User.credits_milli).where(User.name == "alice"))
    assert balance == 2_500 - 3 * 1_000  # overspent by less than one interval
    # A second pass asks nothing again.
    assert billing.tick()[1].stopped_evaluations == []

    # The evaluation runner: SIGTERM (the program's handler runs), then stopped, GPU freed.
    runner = EvaluationRunner(
        db,
        sched,
        lambda: True,
        BackendPool(db, "node-a", backend),
        artifacts=None,  # type: ignore[arg-type]  # a stop reads no code or checkpoint
        dataset_store=None,
        work_dir=tmp_path / "evaluations",
        settings=EvaluationSettings(stop_grace_s=5.0),
        now=clock,
    )
    asyncio.run(runner._drive(sid))
    assert marker.read_text() == "sigterm"
    assert asyncio.run(backend.status(handle)).state in (RunState.EXITED, RunState.MISSING)
    with db.session() as s:
        row = s.get(Submission, sid)
        assert row is not None
        assert row.state == "stopped"
        assert row.message == (
            "stopped: its user's credits ran out (ask an admin for credits, then submit again)"
        )
        p = s.get(PlacementRequestRow, rid)
        assert p is not None and p.state == "released"
        a = s.get(Allocation, p.allocation_id)
        assert a is not None and a.state == "released"


def test_a_queued_evaluation_of_a_user_at_zero_is_asked_to_stop_a_free_one_is_not(
    db: Database,
) -> None:
    with db.session() as s:
        ds = s.scalar(select(Dataset))
        assert ds is not None
        user = s.scalar(select(User).where(User.name == "alice"))
        assert user is not None
        user.credits_milli = 0
        queued = Submission(
            dataset_id=ds.id,
            dataset_ref="mnist@1",
            test_digest="0" * 64,
            user_name="alice",
            session_name="alice/mnist/1",
            checkpoint="1",
            checkpoint_sha256="0" * 64,
            code_digest="0" * 64,
            entry="main.py",
            image="img",
            resources={"gpu_milli": 1000},
            state="queued",
            submitted=T0,
        )
        free = Submission(**{**{c: getattr(queued, c) for c in (
            "dataset_id", "dataset_ref", "test_digest", "user_name", "session_name",
            "checkpoint", "checkpoint_sha256", "code_digest", "entry", "image", "state",
            "submitted")}, "resources": {"cpu_milli": 1000}})  # fmt: skip
        s.add_all([queued, free])
        # Alice holds a paid allocation (another evaluation, running), so she is broke.
        hold(s, "alice", "alice:evaluation/999", [0], T0)
    with db.session() as s:
        decided = enforce(s, POLICY, T0 + timedelta(minutes=1))
    assert decided.stopped_evaluations == [queued.id]
    with db.session() as s:
        reasons = {r.id: r.stop_reason for r in s.scalars(select(Submission))}
    assert reasons == {queued.id: "credits", free.id: None}
