"""The scheduler's cluster snapshot, built from the ledger and reused between passes.

A real database (SQLite); the JSON columns (GPU peers, images, cached datasets) are read as
text and parsed only for nodes that changed, so these cases pin both halves: what a node's
snapshot says, and that a change to any of its inputs (and only that) rebuilds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from gpu_scheduler.model import NodeState
from nsml_server import nodes
from nsml_server.db import Database, check_schema
from nsml_server.models import Gpu, Node
from nsml_server.scheduler import SnapshotCache
from nsml_server.schemas import Heartbeat

T0 = datetime(2026, 1, 1, 12, 0, 0)


def heartbeat(**extra: Any) -> Heartbeat:
    body: dict[str, Any] = {
        "backend": "docker",
        "docker_url": "tcp://node.invalid:2376",
        "cpu_milli": 8000,
        "memory_mib": 32768,
        "gpu_probe": {"kind": "virtual", "enabled": True},
        "gpus": [
            {
                "index": i,
                "uuid": f"GPU-{i}",
                "model": "V100",
                "memory_total_mib": 16384,
                "nvlink_peers": [1 - i],
                "pcie_group": 0,
            }
            for i in range(2)
        ],
        "images": ["img:b", "img:a"],
        "datasets": {"mnist@1": 1000},
    }
    body.update(extra)
    return Heartbeat.model_validate(body)


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


def build(db: Database, cache: SnapshotCache) -> dict[str, Any]:
    with db.session() as s:
        snap = cache.build(s)
    return {n.name: n for n in snap.nodes}


def test_a_nodes_snapshot_carries_its_parsed_json_columns(db: Database) -> None:
    node = build(db, SnapshotCache())["node-a"]
    assert node.images == frozenset({"img:a", "img:b"})
    assert node.datasets == {"mnist@1": 1000}
    assert [g.nvlink_peers for g in node.gpus] == [frozenset({1}), frozenset({0})]
    assert [g.pcie_group for g in node.gpus] == ["0", "0"]
    assert [g.free_milli for g in node.gpus] == [1000, 1000]
    assert node.state == NodeState.UP


def set_dataset(s: Any) -> None:
    nodes.apply_heartbeat(s, "node-a", heartbeat(datasets={"mnist@2": 5}), T0)


def set_image(s: Any) -> None:
    nodes.apply_heartbeat(s, "node-a", heartbeat(images=["img:c"]), T0)


def set_peers(s: Any) -> None:
    node = nodes.get_node(s, "node-a")
    assert node is not None
    node.gpus[0].nvlink_peers = []


def allocate(s: Any) -> None:
    node_id = s.scalar(select(Node.id).where(Node.name == "node-a"))
    s.execute(update(Gpu).where(Gpu.node_id == node_id, Gpu.index == 1).values(allocated_milli=500))


def drain(s: Any) -> None:
    s.execute(update(Node).where(Node.name == "node-a").values(state="draining"))


CHANGES: list[tuple[str, Callable[[Any], None], Callable[[Any], bool]]] = [
    ("a new cached dataset version", set_dataset, lambda n: n.datasets == {"mnist@2": 5}),
    ("a new image list", set_image, lambda n: n.images == frozenset({"img:c"})),
    ("a GPU's NVLink peers", set_peers, lambda n: n.gpus[0].nvlink_peers == frozenset()),
    ("a GPU half allocated", allocate, lambda n: n.gpus[1].free_milli == 500),
    ("a drained node", drain, lambda n: n.state == NodeState.DRAINING),
]


@pytest.mark.parametrize(("what", "change", "seen"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_changed_node_is_rebuilt_and_the_others_are_reused(
    db: Database,
    what: str,
    change: Callable[[Any], None],
    seen: Callable[[Any], bool],
) -> None:
    cache = SnapshotCache()
    before = build(db, cache)
    with db.session() as s:
        change(s)
    after = build(db, cache)
    assert seen(after["node-a"]), what
    assert after["node-a"] is not before["node-a"]
    assert after["node-b"] is before["node-b"]


def test_a_heartbeat_that_changes_nothing_the_policy_reads_rebuilds_nothing(
    db: Database,
) -> None:
    cache = SnapshotCache()
    before = build(db, cache)
    with db.session() as s:
        nodes.apply_heartbeat(s, "node-a", heartbeat(), datetime(2026, 1, 1, 12, 0, 10))
    after = build(db, cache)
    assert after["node-a"] is before["node-a"]
