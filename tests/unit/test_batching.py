"""Group commit of frequent small requests: what arrives together is done together, each
caller still gets its own answer, and one bad request fails alone.

The heartbeat queue and the batched dataset-holds query run against a real database (SQLite).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from nsml_server import ledger, nodes
from nsml_server.api.datasets import holds_etag, prefer_wait
from nsml_server.batching import Batcher, HeartbeatQueue
from nsml_server.datasets import DatasetService
from nsml_server.db import Database, check_schema
from nsml_server.models import DatasetHold
from nsml_server.schemas import Heartbeat, HoldList, HoldOut

T0 = datetime(2026, 1, 1, 12, 0, 0)


def test_what_arrives_while_a_batch_runs_is_the_next_batch_and_answers_keep_their_order() -> None:
    batches: list[list[int]] = []
    first_started = threading.Event()
    release_first = threading.Event()

    def work(items: list[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            first_started.set()
            release_first.wait(10)
        return [i * 10 for i in items]

    async def main() -> list[int]:
        b: Batcher[int, int] = Batcher(work, name="test")
        first = asyncio.ensure_future(b.submit(1))
        while not first_started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(b.submit(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0.01)
        release_first.set()
        out = await asyncio.gather(first, *rest)
        b.close()
        return list(out)

    assert asyncio.run(main()) == [10, 20, 30, 40]
    assert batches == [[1], [2, 3, 4]]


def test_a_batch_that_fails_is_run_again_one_by_one_and_only_the_bad_item_fails() -> None:
    calls: list[list[str]] = []

    def work(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [i.upper() for i in items]

    async def main() -> list[Any]:
        b: Batcher[str, str] = Batcher(work, name="test")
        out = await asyncio.gather(
            *(b.submit(i) for i in ("a", "bad", "c")), return_exceptions=True
        )
        b.close()
        return list(out)

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("A", "C")
    assert isinstance(bad, ValueError)
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'nsml.sqlite'}"
    database = Database(url)
    check_schema(database.engine, url)
    yield database
    database.dispose()


def heartbeat(gpus: int) -> Heartbeat:
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


def test_heartbeats_sent_together_register_every_node_and_answer_each_with_its_own(
    db: Database,
) -> None:
    async def main() -> list[Any]:
        q = HeartbeatQueue(db, lambda: T0)
        out = await asyncio.gather(
            *(q.submit((f"node-{i}", heartbeat(gpus=i))) for i in range(1, 5))
        )
        q.close()
        return list(out)

    answers = asyncio.run(main())
    assert [(a.name, len(a.gpus)) for a in answers] == [
        ("node-1", 1),
        ("node-2", 2),
        ("node-3", 3),
        ("node-4", 4),
    ]
    assert all(g.allocated_milli == 0 for a in answers for g in a.gpus)
    with db.session() as s:
        assert [n.name for n in nodes.list_nodes(s)] == ["node-1", "node-2", "node-3", "node-4"]


def test_the_holds_of_several_nodes_come_from_one_query_each_node_gets_its_own(
    db: Database, tmp_path: Path
) -> None:
    with db.session() as s:
        ids = {}
        for name in ("node-a", "node-b", "node-c"):
            ids[name] = nodes.apply_heartbeat(s, name, heartbeat(gpus=2), T0)
        s.flush()
        node_ids = {name: n.id for name, n in ids.items()}
        grants = [
            ledger.Grant(f"u:job-{i}", "u", node_ids[name], (0,), ("GPU-0",), 500, 100, 64)
            for i, name in enumerate(("node-a", "node-a", "node-b"))
        ]
        alloc = ledger.reserve_many(s, grants, now=T0)
        for aid, name, key, state in [
            (alloc[0], "node-a", "mnist@1", "preparing"),
            (alloc[1], "node-a", "cifar@2", "ready"),
            (alloc[1], "node-a", "old@1", "released"),
            (alloc[2], "node-b", "mnist@1", "ready"),
        ]:
            ds, _, version = key.partition("@")
            s.add(
                DatasetHold(
                    allocation_id=aid,
                    node_id=node_ids[name],
                    dataset=ds,
                    version=int(version),
                    key=key,
                    digest="0" * 64,
                    state=state,
                    created=T0,
                    updated=T0,
                )
            )
    svc = DatasetService.__new__(DatasetService)  # only the database half is exercised
    svc.db = db
    answers = svc.holds_of_nodes(["node-b", "node-c", "node-a", "nowhere"])
    assert [[h.key for h in holds] for holds in answers] == [
        ["mnist@1"],
        [],
        ["mnist@1", "cifar@2"],
        [],
    ]
    assert [h.key for h in svc.holds_of_node("node-a")] == ["mnist@1", "cifar@2"]


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 0.0),
        ("", 0.0),
        ("wait=10", 10.0),
        ("respond-async, wait=5", 5.0),
        ('wait="7"', 7.0),
        ("wait=3600", 30.0),  # capped: a poll never parks longer than HOLDS_WAIT_MAX_S
        ("wait=-4", 0.0),
        ("wait=soon", 0.0),
        ("handling=lenient", 0.0),
    ],
)
def test_a_long_poll_waits_what_prefer_asks_within_the_cap(
    header: str | None, seconds: float
) -> None:
    assert prefer_wait(header) == seconds


def test_the_holds_entity_tag_changes_with_the_holds_and_only_with_them() -> None:
    hold = HoldOut(
        id=1,
        allocation=2,
        key="mnist@1",
        dataset="mnist",
        version=1,
        digest="0" * 64,
        bytes=10,
        state="preparing",
        host_path=None,
    )
    a = holds_etag(HoldList(holds=[hold]))
    assert a == holds_etag(HoldList(holds=[hold.model_copy()]))
    assert a != holds_etag(HoldList(holds=[hold.model_copy(update={"state": "ready"})]))
    assert a != holds_etag(HoldList(holds=[]))
    assert a.startswith('"') and a.endswith('"')


def test_a_batch_with_two_heartbeats_of_one_new_node_registers_it_once_with_the_last(
    db: Database,
) -> None:
    q = HeartbeatQueue(db, lambda: T0)
    first, second = q._apply([("node-x", heartbeat(gpus=1)), ("node-x", heartbeat(gpus=3))])
    q.close()
    assert (first.name, second.name) == ("node-x", "node-x")
    with db.session() as s:
        listed = nodes.list_nodes(s)
    assert [(n.name, len(n.gpus)) for n in listed] == [("node-x", 3)]
