"""Billing with an injected clock: exact charges per interval, no interval charged twice or
skipped across passes, restarts and a leader failover; warnings and safe stops."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from nsml_server import credits
from nsml_server.billing import CreditBilling, charge_pass, enforce
from nsml_server.credits import Policy, Resources, cost_milli
from nsml_server.db import Database, check_schema
from nsml_server.models import (
    Allocation,
    CreditEntry,
    Gpu,
    Node,
    SessionEvent,
    Team,
    TrainingSession,
    User,
    UserNotice,
)
from tests.unit.rows import hold, placed

T0 = datetime(2026, 12, 1, 9, 0, 0)
POLICY = Policy(gpu_hour_milli=60_000, interval_s=60, warn_threshold_milli=5_000)


class Clock:
    """A clock the test moves."""

    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'nsml.sqlite'}")
    check_schema(database.engine, database.url)
    with database.session() as s:
        credits.set_policy(s, POLICY, "root", T0 - timedelta(days=1))
        node = Node(name="n1", cpu_milli=64000, memory_mib=256000, created=T0)
        node.gpus = [Gpu(index=i, uuid=f"g{i}", model="A100") for i in range(8)]
        s.add(node)
    return database


def add_user(db: Database, name: str, credits_milli: int, **kw: object) -> None:
    with db.session() as s:
        credits.ensure_user(s, name, T0 - timedelta(days=1), credits_milli)
        for k, v in kw.items():
            setattr(s.scalar(select(User).where(User.name == name)), k, v)


def run_session(
    db: Database, user: str, number: int, gpus: list[int], start: datetime
) -> tuple[int, int]:
    """A running session of *user* holding *gpus* since *start*: (session id, allocation id)."""
    with db.session() as s:
        a = hold(s, user, f"{user}:session/mnist/{number}", gpus, start)
        placement_id = placed(s, a)
        row = TrainingSession(
            name=f"{user}/mnist/{number}",
            user_name=user,
            dataset_key="mnist",
            number=number,
            state="running",
            code_digest="0" * 64,
            entry="main.py",
            image="img",
            resources={"gpu_milli": 1000 * len(gpus)},
            placement_id=placement_id,
            created=start,
            started=start,
        )
        s.add(row)
        s.flush()
        return row.id, a.id


def release(db: Database, alloc_id: int, at: datetime) -> None:
    with db.session() as s:
        a = s.get(Allocation, alloc_id)
        assert a is not None
        a.state, a.released = "released", at


def charged(db: Database, alloc_id: int) -> tuple[int, int]:
    """(milli charged, rows) for one allocation."""
    with db.session() as s:
        total, rows = s.execute(
            select(func.coalesce(func.sum(CreditEntry.amount_milli), 0), func.count()).where(
                CreditEntry.allocation_id == alloc_id
            )
        ).one()
    return -int(total), int(rows)


def assert_ledger_consistent(db: Database) -> None:
    with db.session() as s:
        assert credits.mismatched_balances(s) == []


def test_two_gpus_for_90_minutes_are_charged_exactly_the_policys_amount(db: Database) -> None:
    add_user(db, "alice", 1_000_000)
    start = T0 + timedelta(seconds=17.25)  # not on an interval boundary
    _, aid = run_session(db, "alice", 1, [0, 1], start)
    clock = Clock(T0)
    billing = CreditBilling(db, now=clock)
    end = start + timedelta(minutes=90)
    while clock.t < end + timedelta(minutes=3):
        clock.t += timedelta(seconds=60)
        if clock.t >= end:
            release(db, aid, end)
        billing.tick()
    expected = cost_milli(POLICY, Resources(2000, "A100"), 90 * 60)
    assert expected == 180_000  # 2 GPUs x 1.5 h x 60 credits
    assert charged(db, aid) == (expected, 91)  # 91 intervals touched (a partial one each end)
    with db.session() as s:
        assert credits.balance_milli(s, "alice") == 1_000_000 - expected
    assert_ledger_consistent(db)


def test_a_pass_run_twice_or_late_charges_every_interval_once(db: Database) -> None:
    add_user(db, "bob", 1_000_000)
    _, aid = run_session(db, "bob", 1, [0], T0)
    t = T0 + timedelta(minutes=10, seconds=5)
    with db.session() as s:
        first = charge_pass(s, POLICY, t)
    with db.session() as s:
        again = charge_pass(s, POLICY, t)
    assert (first.charges, again.charges) == (10, 0)
    assert charged(db, aid) == (10_000, 10)
    with db.session() as s:  # a pass from a server whose clock lags: nothing new, nothing lost
        assert charge_pass(s, POLICY, t - timedelta(minutes=3)).charges == 0
    assert_ledger_consistent(db)


def test_a_leader_failover_neither_double_charges_nor_skips(db: Database) -> None:
    add_user(db, "carol", 1_000_000)
    _, aid = run_session(db, "carol", 1, [0, 1, 2], T0 + timedelta(seconds=30))
    leader = {"name": "a"}
    clock = Clock(T0)
    a = CreditBilling(db, is_leader=lambda: leader["name"] == "a", now=clock)
    b = CreditBilling(db, is_leader=lambda: leader["name"] == "b", now=clock)
    for minute in range(1, 61):
        clock.t = T0 + timedelta(minutes=minute, seconds=1)
        if minute == 20:
            leader["name"] = None  # type: ignore[assignment]  # a dies; the lease lapses
        if minute == 27:
            leader["name"] = "b"  # b takes over after 7 silent minutes
        for server in (a, b):
            if server.is_leader():
                server.tick()
        if minute == 40:
            a.tick()  # a's last pass, late (it lost the lease while running it)
    total, rows = charged(db, aid)
    assert rows == 60  # every interval from 09:00 to 10:00, once
    assert total == cost_milli(POLICY, Resources(3000, "A100"), 60 * 60 - 30)
    with db.session() as s:
        starts = s.scalars(
            select(CreditEntry.interval_start).where(CreditEntry.allocation_id == aid)
        ).all()
    assert sorted(starts) == [T0 + timedelta(minutes=m) for m in range(60)]
    assert_ledger_consistent(db)


def test_running_out_stops_the_session_with_reason_credits_within_one_interval(
    db: Database,
) -> None:
    add_user(db, "dave", 10_000)  # 10 minutes of one GPU at 60 credits an hour
    sid, aid = run_session(db, "dave", 1, [3], T0)
    clock = Clock(T0)
    billing = CreditBilling(db, now=clock)
    stopped_at = None
    for minute in range(1, 30):
        clock.t = T0 + timedelta(minutes=minute, seconds=1)
        _, decided = billing.tick()
        if decided.stopped_sessions:
            stopped_at = minute
            break
    assert stopped_at == 10
    with db.session() as s:
        row = s.get(TrainingSession, sid)
        assert row is not None
        assert (row.stop_requested, row.reason) == (True, "credits")
        balance = credits.balance_milli(s, "dave")
        messages = [e.message for e in s.scalars(select(SessionEvent))]
    one_interval = cost_milli(POLICY, Resources(1000, "A100"), 60)
    assert -one_interval <= balance <= 0
    assert any(m.startswith("Credits low") for m in messages)
    assert any(m.startswith("stopping: out of credits") for m in messages)
    # the next pass asks nothing again
    clock.t += timedelta(minutes=1)
    assert billing.tick()[1].stopped_sessions == []
    release(db, aid, clock.t)


def test_the_low_balance_warning_is_given_once_and_rearmed_by_a_grant(db: Database) -> None:
    add_user(db, "erin", 6_000)
    run_session(db, "erin", 1, [4], T0)
    with db.session() as s:
        charge_pass(s, POLICY, T0 + timedelta(minutes=2))
        first = enforce(s, POLICY, T0 + timedelta(minutes=2))
    with db.session() as s:
        second = enforce(s, POLICY, T0 + timedelta(minutes=2))
        credits.grant(s, "erin", 1_000, "top-up", "root", T0 + timedelta(minutes=2))
    with db.session() as s:
        third = enforce(s, POLICY, T0 + timedelta(minutes=2))
    assert (first.warned, second.warned, third.warned) == (
        [(False, "erin")],
        [],
        [(False, "erin")],
    )


def test_a_gpu_notebook_out_of_credits_is_warned_then_stopped(db: Database) -> None:
    add_user(db, "fay", 0)
    with db.session() as s:
        hold(s, "fay", "fay:notebook", [5], T0, gpu_milli=500)
        hold(s, "fay", "fay:notebook:cpu", [], T0, gpu_milli=0)
    stopped: list[tuple[str, str]] = []

    async def stop_server(user: str, server: str) -> None:
        stopped.append((user, server))

    clock = Clock(T0 + timedelta(minutes=1))
    billing = CreditBilling(db, now=clock, stop_server=stop_server, notebook_grace_s=120)
    _, first = billing.tick()
    assert (first.notebooks_warned, first.notebooks_to_stop) == ([("fay", "")], [])
    clock.t += timedelta(minutes=1)
    assert billing.tick()[1].notebooks_to_stop == []
    clock.t += timedelta(minutes=1)
    _, third = billing.tick()
    assert third.notebooks_to_stop == [("fay", "")]  # the CPU-only server is left alone


def test_the_warning_before_a_notebook_server_stops_reaches_the_users_open_notebooks(
    db: Database,
) -> None:
    add_user(db, "fox", 0)
    with db.session() as s:
        hold(s, "fox", "fox:notebook:gpu", [4], T0)
    clock = Clock(T0 + timedelta(minutes=1))
    billing = CreditBilling(db, now=clock)
    billing.tick()  # the notices are written with the decision, for every process's stream

    def notices() -> dict[str, str]:
        with db.session() as s:
            rows = s.scalars(select(UserNotice).order_by(UserNotice.id)).all()
            assert {r.user_name for r in rows} <= {"fox"}
            return {r.subject: r.message for r in rows}

    said = notices()
    assert set(said) == {"credits low", "notebook server stopping: out of credits"}, said
    words = said["notebook server stopping: out of credits"]
    assert "notebook server gpu holds GPUs" in words and "files are kept" in words, words
    clock.t += timedelta(days=1, minutes=1)  # a day later the pass deletes them
    billing.tick()
    assert notices() == {}


def test_a_team_that_pays_is_charged_instead_of_its_member(db: Database) -> None:
    with db.session() as s:
        s.add(Team(name="vision", pays=True, credits_milli=0, created=T0))
        s.flush()
        credits.grant(s, "vision", 100_000, "budget", "root", T0, team=True)
    add_user(db, "gus", 1_000, groups=["vision"], billing_team="vision")
    add_user(db, "hal", 1_000, groups=[], billing_team="vision")  # not a member: pays himself
    run_session(db, "gus", 1, [6], T0)
    run_session(db, "hal", 1, [7], T0)
    with db.session() as s:
        charge_pass(s, POLICY, T0 + timedelta(minutes=1))
        assert credits.balance_milli(s, "vision", team=True) == 99_000
        assert credits.balance_milli(s, "gus") == 1_000
        assert credits.balance_milli(s, "hal") == 0
        assert credits.burn_rate_milli_per_hour(s, "vision", T0, team=True) == 60_000
        assert credits.burn_rate_milli_per_hour(s, "gus", T0) == 0
    assert_ledger_consistent(db)


def test_allocations_free_under_the_policy_leave_no_rows(db: Database) -> None:
    add_user(db, "ida", 1_000)
    with db.session() as s:
        node = s.scalar(select(Node))
        assert node is not None
        s.add(Allocation(holder="ida:notebook", user_name="ida", node_id=node.id, created=T0))
    with db.session() as s:
        report = charge_pass(s, POLICY, T0 + timedelta(hours=1))
    assert (report.allocations, report.charges) == (1, 0)
