"""The scheduler places a notebook server on the node that holds its user's home.

Two nodes in the ledger (a real database, the real scheduler pass): a request that names its
home node is placed there; when the home node is full, it is placed elsewhere and the
request's reason says why, for the spawner to tell the user.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from gpu_scheduler.policy import PlacementPolicy
from nsml_server import ledger, nodes
from nsml_server.db import Database, check_schema
from nsml_server.lease import LeaderLease
from nsml_server.models import PlacementRequestRow
from nsml_server.scheduler import Scheduler, Submission, request_of
from nsml_server.schemas import Heartbeat

T0 = datetime(2026, 1, 1, 12, 0, 0)


def heartbeat(gpus: int = 2) -> Heartbeat:
    return Heartbeat.model_validate(
        {
            "backend": "local",
            "cpu_milli": 8000,
            "memory_mib": 32768,
            "gpu_probe": {"kind": "virtual", "enabled": True},
            "gpus": [
                {"index": i, "uuid": f"GPU-{i}", "model": "V100", "memory_total_mib": 16384}
                for i in range(gpus)
            ],
        }
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'nsml.sqlite'}"
    database = Database(url)
    check_schema(database.engine, url)
    with database.session() as s:
        for name in ("node-a", "node-b"):
            nodes.apply_heartbeat(s, name, heartbeat(), T0)
    yield database
    database.dispose()


def scheduler(db: Database) -> Scheduler:
    lease = LeaderLease(db, "s1", ttl_s=3, now=lambda: T0)
    lease.tick()
    return Scheduler(db, lease, PlacementPolicy(), now=lambda: T0)


SPEC = {"gpu_milli": 1000, "cpu_milli": 1000, "memory_mib": 1024, "home_node": "node-b"}


def submit_and_pass(
    db: Database, sched: Scheduler, holder: str, spec: dict[str, object]
) -> PlacementRequestRow:
    with db.session() as s:
        ((rid, _, _),) = sched.submit_many(s, [Submission("alice", holder, spec)])
    sched.run_pass()
    with db.session() as s:
        row = s.get(PlacementRequestRow, rid)
        assert row is not None
        s.expunge(row)
        return row


def node_of(db: Database, row: PlacementRequestRow) -> str:
    with db.session() as s:
        from nsml_server.models import Allocation, Node

        alloc = s.get(Allocation, row.allocation_id)
        assert alloc is not None
        node = s.get(Node, alloc.node_id)
        assert node is not None
        return node.name


def test_the_stored_spec_carries_the_home_node_to_the_policy() -> None:
    assert request_of(SPEC).home_node == "node-b"
    assert request_of({k: v for k, v in SPEC.items() if k != "home_node"}).home_node is None


def test_a_server_is_placed_on_the_node_that_holds_its_home(db: Database) -> None:
    sched = scheduler(db)
    row = submit_and_pass(db, sched, "alice:notebook", SPEC)
    assert row.state == "placed" and node_of(db, row) == "node-b"
    assert row.message == "placed on node-b"
    # Without a home, the first node in the stable order takes it.
    row = submit_and_pass(db, sched, "alice:other", {**SPEC, "home_node": None})
    assert node_of(db, row) == "node-a"


def test_a_full_home_node_sends_the_server_elsewhere_and_the_reason_says_why(
    db: Database,
) -> None:
    with db.session() as s:
        ledger.reserve(
            s,
            holder="bob:notebook",
            user_name="bob",
            node_name="node-b",
            gpu_indices=[0, 1],
            gpu_milli_per_gpu=1000,
            cpu_milli=1000,
            memory_mib=1024,
            now=T0,
        )
    row = submit_and_pass(db, scheduler(db), "alice:notebook", SPEC)
    assert row.state == "placed" and node_of(db, row) == "node-a"
    assert row.message == (
        "placed on node-a; not on node-b, which holds the home folder: Insufficient gpu: "
        "requested 1, free 0 on node-b"
    )
