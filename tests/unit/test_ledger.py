"""The ledger never gives a GPU twice; the lease elects one scheduler and fences the old one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError

from nsml_server import ledger, nodes
from nsml_server.db import Database
from nsml_server.lease import LeaderLease, LostLease
from nsml_server.models import PlacementRequestRow
from nsml_server.scheduler import Scheduler, Submission, SubmitQueue
from nsml_server.schemas import Heartbeat
from tests.unit.dbs import BOTH, empty_database

T0 = datetime(2026, 1, 1, 12, 0, 0)


def heartbeat(gpus: int = 4, cpu: int = 16000, mem: int = 65536) -> Heartbeat:
    return Heartbeat.model_validate(
        {
            "cpu_milli": cpu,
            "memory_mib": mem,
            "gpu_probe": {"kind": "virtual", "enabled": True},
            "gpus": [
                {"index": i, "uuid": f"GPU-{i}", "model": "V100", "memory_total_mib": 16384}
                for i in range(gpus)
            ],
        }
    )


@pytest.fixture(params=BOTH)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    database = empty_database(request, tmp_path)
    with database.session() as s:
        nodes.apply_heartbeat(s, "node-a", heartbeat(), T0)
    yield database
    database.dispose()


def reserve(db: Database, holder: str, gpus: list[int], milli: int = 1000, **kw: int) -> int:
    with db.session() as s:
        a = ledger.reserve(
            s,
            holder=holder,
            user_name="alice",
            node_name="node-a",
            gpu_indices=gpus,
            gpu_milli_per_gpu=milli,
            cpu_milli=kw.get("cpu", 1000),
            memory_mib=kw.get("mem", 1024),
            now=T0,
        )
        return a.id


def gpu_milli(db: Database) -> list[int]:
    with db.session() as s:
        return [g.allocated_milli for g in nodes.get_node(s, "node-a").gpus]  # type: ignore[union-attr]


def test_a_whole_gpu_is_never_given_twice(db: Database) -> None:
    reserve(db, "s1", [0, 1])
    with pytest.raises(ledger.Conflict, match="gpu1"):
        reserve(db, "s2", [1, 2])
    assert gpu_milli(db) == [1000, 1000, 0, 0], "the failed reservation left nothing behind"


def test_fractions_share_a_gpu_up_to_1000_milli(db: Database) -> None:
    reserve(db, "a", [0], 600)
    reserve(db, "b", [0], 400)
    with pytest.raises(ledger.Conflict):
        reserve(db, "c", [0], 1)
    assert gpu_milli(db)[0] == 1000


def test_cpu_and_memory_are_reserved_too(db: Database) -> None:
    reserve(db, "a", [], 0, cpu=15000)
    with pytest.raises(ledger.Conflict, match="CPU/memory"):
        reserve(db, "b", [], 0, cpu=2000)


def test_release_is_idempotent_and_gives_everything_back(db: Database) -> None:
    aid = reserve(db, "a", [0, 1], cpu=4000)
    with db.session() as s:
        assert ledger.release(s, aid, T0) is True
    with db.session() as s:
        assert ledger.release(s, aid, T0) is False
        node = nodes.get_node(s, "node-a")
        assert node is not None and node.cpu_allocated_milli == 0
    assert gpu_milli(db) == [0, 0, 0, 0]


def test_a_draining_node_receives_nothing(db: Database) -> None:
    with db.session() as s:
        node = nodes.get_node(s, "node-a")
        assert node is not None
        node.state = "draining"
    with pytest.raises(ledger.Conflict, match="not up"):
        reserve(db, "a", [0])


def test_one_active_allocation_per_holder(db: Database) -> None:
    reserve(db, "same", [0])
    with pytest.raises(IntegrityError):
        reserve(db, "same", [1])


def test_the_database_refuses_an_over_allocated_gpu_whatever_the_code(db: Database) -> None:
    with pytest.raises(IntegrityError), db.session() as s:
        s.execute(text('UPDATE gpus SET allocated_milli = 1001 WHERE "index" = 0'))


def test_concurrent_reservations_of_one_gpu_have_one_winner(db: Database) -> None:
    wins, conflicts, errors = [], [], []
    barrier = threading.Barrier(12)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            reserve(db, f"h{i}", [3])
            wins.append(i)
        except ledger.Conflict:
            conflicts.append(i)
        except Exception as e:  # e.g. SQLite "database is locked" must not happen
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(wins) == 1 and len(conflicts) == 11
    assert gpu_milli(db)[3] == 1000


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t


def test_one_leader_and_takeover_after_the_lease_lapses(db: Database) -> None:
    clock = Clock()
    a = LeaderLease(db, "server-a", ttl_s=3, now=clock)
    b = LeaderLease(db, "server-b", ttl_s=3, now=clock)
    assert a.tick() and a.epoch == 1
    assert not b.tick()
    clock.t += timedelta(seconds=2)
    assert a.tick(), "renewal keeps the lease"
    clock.t += timedelta(seconds=2)
    assert not b.tick(), "renewed 2 s ago, still valid"
    clock.t += timedelta(seconds=4)  # a stops renewing (crash, pause, partition)
    assert b.tick() and b.epoch == 2
    with pytest.raises(LostLease), db.session() as s:
        a.fence(s)
    assert not a.tick() and not a.is_leader


def test_a_resigned_lease_is_taken_over_at_once(db: Database) -> None:
    clock = Clock()
    a = LeaderLease(db, "server-a", ttl_s=30, now=clock)
    b = LeaderLease(db, "server-b", ttl_s=30, now=clock)
    assert a.tick()
    a.resign()
    assert b.tick() and b.epoch == 2


def test_fence_passes_for_the_leader(db: Database) -> None:
    a = LeaderLease(db, "server-a", ttl_s=3, now=Clock())
    a.tick()
    with db.session() as s:
        assert a.fence(s) == 1


def test_a_silent_node_is_marked_down_and_receives_nothing(db: Database) -> None:
    with db.session() as s:
        assert (
            nodes.mark_silent_nodes_down(s, T0 + timedelta(seconds=30), timedelta(seconds=45)) == []
        )
        assert nodes.mark_silent_nodes_down(
            s, T0 + timedelta(seconds=60), timedelta(seconds=45)
        ) == ["node-a"]
    with pytest.raises(ledger.Conflict, match="not up"):
        reserve(db, "late", [0])
    with db.session() as s:  # its next heartbeat brings it back
        node = nodes.apply_heartbeat(s, "node-a", heartbeat(), T0 + timedelta(seconds=61))
        assert node.state == "up"
    reserve(db, "late", [0])


def test_a_gpu_missing_from_a_heartbeat_turns_unhealthy_and_is_not_given(db: Database) -> None:
    with db.session() as s:
        nodes.apply_heartbeat(s, "node-a", heartbeat(gpus=3), T0)
    with pytest.raises(ledger.Conflict, match="gpu3"):
        reserve(db, "x", [3])
    with db.session() as s:
        node = nodes.get_node(s, "node-a")
        assert node is not None and [g.healthy for g in node.gpus] == [True, True, True, False]


def scheduler_for(db: Database) -> Scheduler:
    from gpu_scheduler.policy import PlacementPolicy

    return Scheduler(
        db, LeaderLease(db, "s1", ttl_s=3, now=lambda: T0), PlacementPolicy(), now=lambda: T0
    )


def test_a_batch_of_submissions_is_idempotent_per_holder(db: Database) -> None:
    sched = scheduler_for(db)
    spec = {"gpu_milli": 1000, "cpu_milli": 100, "memory_mib": 64}
    subs = [Submission("alice", h, spec) for h in ("alice:a", "alice:b", "alice:a")]
    with db.session() as s:
        first = sched.submit_many(s, subs)
    assert [f for _, f, _ in first] == [True, True, False]
    assert first[0][0] == first[2][0] != first[1][0]
    with db.session() as s:  # a waiting request is returned again, nothing new is queued
        again = sched.submit_many(s, [Submission("alice", "alice:b", spec)])
        assert again[0][:2] == (first[1][0], False)
        assert s.scalar(select(func.count()).select_from(PlacementRequestRow)) == 2


def test_a_holder_whose_allocation_was_released_gets_a_new_request(db: Database) -> None:
    sched = scheduler_for(db)
    spec = {"gpu_milli": 1000, "cpu_milli": 100, "memory_mib": 64}
    with db.session() as s:
        ((rid, _, _),) = sched.submit_many(s, [Submission("alice", "alice:a", spec)])
    aid = reserve(db, "alice:a", [0])
    with db.session() as s:
        s.execute(
            update(PlacementRequestRow)
            .where(PlacementRequestRow.id == rid)
            .values(state="placed", allocation_id=aid)
        )
        assert sched.submit_many(s, [Submission("alice", "alice:a", spec)])[0][:2] == (rid, False)
        ledger.release(s, aid, T0)
        rid2, fresh, _ = sched.submit_many(s, [Submission("alice", "alice:a", spec)])[0]
    assert fresh and rid2 != rid


def test_the_submit_queue_commits_concurrent_submissions_and_fails_a_bad_one_alone(
    db: Database,
) -> None:
    import asyncio

    sched = scheduler_for(db)
    queue = SubmitQueue(sched, lambda s, row: row.id)
    spec = {"gpu_milli": 0, "cpu_milli": 100, "memory_mib": 64}

    async def go() -> list[object]:
        subs = [Submission("alice", f"alice:{i}", spec) for i in range(20)]
        subs.append(Submission("alice", "alice:bad", {"x": object()}))  # not JSON: fails
        subs.append(Submission("alice", "alice:3", spec))
        return list(await asyncio.gather(*(queue.submit(x) for x in subs), return_exceptions=True))

    try:
        results = asyncio.run(go())
    finally:
        queue.close()
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(ok) == 21
    assert isinstance(results[20], Exception)
    assert results[21][0] == results[3][0] and results[21][3] == results[3][0]  # type: ignore[index]
    with db.session() as s:
        ids = set(s.scalars(select(PlacementRequestRow.id)))
    assert {r[0] for r in ok} <= ids  # type: ignore[index]
