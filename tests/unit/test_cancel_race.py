"""A request cancelled while the scheduler places it never leaves its allocation held.

Two races between a user's cancel (``DELETE placements/{id}``, a session stopped while it
waits) and a scheduling pass, on a real database and the real pass:

* the cancel read the request while it was waiting, and a pass placed it before the cancel
  wrote: the cancel must release the allocation the pass made, not mark the request
  cancelled over it (SQLite and PostgreSQL);
* the cancel committed after the pass read the waiting requests and before it wrote them
  (PostgreSQL, whose writers do not wait for each other here): the pass must release what it
  reserved for a request that is no longer waiting.

Either way the node's CPU, memory and GPUs are free again afterwards and no allocation is
left active.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from nsml_server import nodes
from nsml_server.db import Database
from nsml_server.models import Allocation, Gpu, Node, PlacementRequestRow
from nsml_server.scheduler import Scheduler, Submission
from tests.unit.dbs import BOTH, empty_database
from tests.unit.test_scheduler_home import T0, heartbeat, scheduler

SPEC = {"gpu_milli": 1000, "cpu_milli": 1000, "memory_mib": 1024}


@pytest.fixture(params=BOTH)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    database = empty_database(request, tmp_path)
    with database.session() as s:
        nodes.apply_heartbeat(s, "node-a", heartbeat(), T0)
    yield database
    database.dispose()


def submit(db: Database, sched: Scheduler) -> int:
    with db.session() as s:
        ((rid, _, _),) = sched.submit_many(s, [Submission("alice", "alice:ok", SPEC)])
    return rid


def request_state(db: Database, rid: int) -> str:
    with db.session() as s:
        return str(s.scalar(select(PlacementRequestRow.state).where(PlacementRequestRow.id == rid)))


def assert_nothing_held(db: Database) -> None:
    with db.session() as s:
        active = s.scalars(select(Allocation).where(Allocation.state == "active")).all()
        assert [a.holder for a in active] == []
        node = s.scalar(select(Node))
        assert node is not None
        assert (node.cpu_allocated_milli, node.memory_allocated_mib) == (0, 0)
        assert {g.allocated_milli for g in s.scalars(select(Gpu))} == {0}


def test_a_cancel_that_read_the_request_waiting_releases_what_a_pass_placed_meanwhile(
    db: Database,
) -> None:
    sched = scheduler(db)
    rid = submit(db, sched)
    with db.session() as s:
        row = s.get(PlacementRequestRow, rid)
        assert row is not None and row.state == "waiting"
        assert sched.run_pass().placed == 1  # commits while the cancel holds its stale row
        assert sched.release(s, row) is True
        assert row.state == "released"
    assert request_state(db, rid) == "released"
    assert_nothing_held(db)


def test_a_cancel_of_a_waiting_request_cancels_it_and_a_later_pass_places_nothing(
    db: Database,
) -> None:
    sched = scheduler(db)
    rid = submit(db, sched)
    with db.session() as s:
        row = s.get(PlacementRequestRow, rid)
        assert row is not None
        assert sched.release(s, row) is True
        assert sched.release(s, row) is False  # idempotent
    assert sched.run_pass().placed == 0
    assert request_state(db, rid) == "cancelled"
    assert_nothing_held(db)


@pytest.mark.parametrize("db", [pytest.param("postgresql", marks=pytest.mark.db)], indirect=True)
def test_a_cancel_committed_during_a_pass_gets_the_reservation_released_by_the_pass(
    db: Database,
) -> None:
    sched = scheduler(db)
    rid = submit(db, sched)
    build = sched.snapshots.build
    cancelled: list[bool] = []

    def cancel() -> None:
        with db.session() as s:
            row = s.get(PlacementRequestRow, rid)
            assert row is not None
            cancelled.append(sched.release(s, row))

    def build_then_cancel(s: Any) -> Any:
        """The pass has read the waiting requests; another server's cancel commits now."""
        snapshot = build(s)
        t = threading.Thread(target=cancel)
        t.start()
        t.join(30)
        assert not t.is_alive(), "the cancel waited for the pass: it could not race it"
        return snapshot

    sched.snapshots.build = build_then_cancel  # type: ignore[method-assign]
    result = sched.run_pass()
    assert cancelled == [True]
    assert result.placed == 0
    assert rid not in sched.decisions
    assert request_state(db, rid) == "cancelled"
    assert_nothing_held(db)
