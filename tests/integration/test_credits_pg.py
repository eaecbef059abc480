"""Credits on a real PostgreSQL: concurrent charges and grants from many writers (each with
its own engine, as separate server processes have) never lose an update, and two servers
that both run a billing pass (a leader and a standby taking over) charge every interval
exactly once."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from nsml_server import credits
from nsml_server.billing import CreditBilling, charge_pass
from nsml_server.credits import Policy, Resources, cost_milli
from nsml_server.db import Database, check_schema
from nsml_server.models import Allocation, CreditEntry, Gpu, Node
from tests.integration.test_standby import fresh_database

pytestmark = [pytest.mark.db]

T0 = datetime(2026, 12, 1, 9, 0, 0)
POLICY = Policy(gpu_hour_milli=60_000, interval_s=60)
WRITERS = 8


@pytest.fixture()
def db_url(postgres_url: str) -> Iterator[str]:
    url = fresh_database(postgres_url, f"nsml_credits_{os.getpid()}")
    db = Database(url)
    check_schema(db.engine, db.url)
    with db.session() as s:
        credits.set_policy(s, POLICY, "root", T0 - timedelta(days=1))
        node = Node(name="n1", cpu_milli=64000, memory_mib=256000, created=T0)
        node.gpus = [Gpu(index=i, uuid=f"g{i}", model="A100") for i in range(8)]
        s.add(node)
        s.flush()
        for u in ("alice", "bob"):
            credits.ensure_user(s, u, T0, 10_000_000)
        for i in range(40):
            s.add(
                Allocation(
                    holder=f"{'alice' if i % 2 else 'bob'}:session/x/{i}",
                    user_name="alice" if i % 2 else "bob",
                    node_id=node.id,
                    gpu_indices=[i % 8],
                    gpu_milli_per_gpu=125,
                    created=T0,
                )
            )
    db.dispose()
    yield url


def test_concurrent_charges_and_grants_lose_no_update(db_url: str) -> None:
    barrier = threading.Barrier(WRITERS)
    grants_each = 25

    def writer(i: int) -> int:
        db = Database(db_url)  # its own engine and connections: another "server"
        barrier.wait()
        granted = 0
        try:
            for k in range(grants_each):
                with db.session() as s:
                    credits.grant(s, "alice", 1 + i, f"w{i}.{k}", f"admin{i}", T0)
                    granted += 1 + i
                # every writer also runs billing passes for later and later minutes
                with db.session() as s:
                    charge_pass(s, POLICY, T0 + timedelta(minutes=k + 1, seconds=i))
        finally:
            db.dispose()
        return granted

    with cf.ThreadPoolExecutor(WRITERS) as pool:
        granted = sum(pool.map(writer, range(WRITERS)))
    db = Database(db_url)
    try:
        with db.session() as s:
            assert credits.mismatched_balances(s) == []
            rows = s.execute(
                select(CreditEntry.allocation_id, CreditEntry.interval_start, func.count())
                .where(CreditEntry.kind == "charge")
                .group_by(CreditEntry.allocation_id, CreditEntry.interval_start)
                .having(func.count() > 1)
            ).all()
            assert rows == []  # no interval charged twice
            charged = -int(
                s.scalar(
                    select(func.sum(CreditEntry.amount_milli)).where(
                        CreditEntry.account == "alice", CreditEntry.kind == "charge"
                    )
                )
                or 0
            )
            # 20 allocations of 1/8 GPU for 25 minutes, each minute charged once
            assert charged == 20 * cost_milli(POLICY, Resources(125, "A100"), 25 * 60)
            assert credits.balance_milli(s, "alice") == 10_000_000 + granted - charged
    finally:
        db.dispose()


def test_two_servers_billing_at_once_charge_each_interval_once(db_url: str) -> None:
    """A leader and a standby that took over while the old leader's pass still ran: both
    passes run concurrently, over and over, and each interval is charged once."""
    dbs = [Database(db_url), Database(db_url)]
    minute = {"t": T0}
    servers = [CreditBilling(db, now=lambda: minute["t"]) for db in dbs]
    try:
        for m in range(1, 31):
            minute["t"] = T0 + timedelta(minutes=m, seconds=2)
            barrier = threading.Barrier(2)

            def one(b: CreditBilling, barrier: threading.Barrier = barrier) -> int:
                barrier.wait()
                return b.tick()[0].charges

            with cf.ThreadPoolExecutor(2) as pool:
                got = list(pool.map(one, servers))
            assert sum(got) == 40  # 40 allocations, one interval each, between both servers
        with dbs[0].session() as s:
            n = s.scalar(
                select(func.count()).select_from(CreditEntry).where(CreditEntry.kind == "charge")
            )
            assert n == 40 * 30
            assert credits.mismatched_balances(s) == []
    finally:
        for db in dbs:
            db.dispose()
