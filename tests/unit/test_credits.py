"""Credits without a server: the cost of resources over time (table-driven), the ledger and
its cached balances, the policy, the audit log."""

from __future__ import annotations

import itertools
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from nsml_server import audit, credits
from nsml_server.credits import (
    CreditError,
    Policy,
    Resources,
    cost_milli,
    cost_per_hour_milli,
    interval_charge_milli,
    interval_floor,
)
from nsml_server.db import Database, check_schema
from nsml_server.models import Allocation, Gpu, Node, Team, User

T0 = datetime(2026, 12, 1, 9, 0, 0)

# ---- cost of resources over time ----------------------------------------------------------------

P1 = Policy(gpu_hour_milli=1000)
A100 = Policy(gpu_hour_milli=1000, gpu_hour_milli_by_model={"A100": 3000})
FULL = Policy(gpu_hour_milli=1000, cpu_hour_milli=100, memory_gb_hour_milli=10)


@pytest.mark.parametrize(
    ("name", "policy", "resources", "seconds", "milli"),
    [
        ("one GPU for an hour costs the default rate", P1, Resources(1000), 3600, 1000),
        ("two GPUs for 90 minutes", P1, Resources(2000), 5400, 3000),
        ("the model's own rate", A100, Resources(1000, "A100"), 3600, 3000),
        ("an unlisted model pays the default", A100, Resources(1000, "V100"), 3600, 1000),
        ("half a GPU pays half", P1, Resources(500), 3600, 500),
        ("CPU and memory are charged too", FULL, Resources(0, None, 2000, 4096), 3600, 240),
        ("all three add up", FULL, Resources(1000, None, 1000, 1024), 1800, 555),
        ("a minute of one GPU rounds down", P1, Resources(1000), 60, 16),
        ("no time costs nothing", P1, Resources(8000), 0, 0),
        ("negative time costs nothing", P1, Resources(1000), -60, 0),
        ("nothing held costs nothing", FULL, Resources(), 3600, 0),
    ],
)
def test_cost_of_resources_over_time(
    name: str, policy: Policy, resources: Resources, seconds: float, milli: int
) -> None:
    assert cost_milli(policy, resources, seconds) == milli, name


@pytest.mark.parametrize(
    ("resources", "per_hour"),
    [(Resources(1000), 1000), (Resources(333), 333), (Resources(0, None, 1, 1), 1)],
)
def test_the_hourly_cost_rounds_up(resources: Resources, per_hour: int) -> None:
    assert cost_per_hour_milli(FULL, resources) == per_hour


@pytest.mark.parametrize("interval_s", [1, 7, 60, 61, 300, 3600])
def test_interval_charges_add_up_exactly_to_the_whole(interval_s: int) -> None:
    r = Resources(2000, None, 1500, 3000)
    total = 5400.5
    edges = [*range(0, int(total), interval_s), total]
    charged = sum(interval_charge_milli(FULL, r, a, b) for a, b in itertools.pairwise(edges))
    assert charged == cost_milli(FULL, r, total)


@pytest.mark.parametrize(
    ("t", "interval_s", "start"),
    [
        (datetime(2026, 12, 1, 9, 0, 59, 999999), 60, datetime(2026, 12, 1, 9, 0, 0)),
        (datetime(2026, 12, 1, 9, 1, 0), 60, datetime(2026, 12, 1, 9, 1, 0)),
        (datetime(2026, 12, 1, 9, 7, 30), 300, datetime(2026, 12, 1, 9, 5, 0)),
        (datetime(2026, 12, 1, 9, 59, 59), 3600, datetime(2026, 12, 1, 9, 0, 0)),
    ],
)
def test_intervals_are_aligned_on_the_epoch(t: datetime, interval_s: int, start: datetime) -> None:
    assert interval_floor(t, interval_s) == start


@pytest.mark.parametrize(
    ("milli", "text"), [(0, "0.000"), (12345, "12.345"), (-5, "-0.005"), (1000, "1.000")]
)
def test_credits_are_shown_with_three_decimals(milli: int, text: str) -> None:
    assert credits.format_credits(milli) == text


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (Policy(gpu_hour_milli=-1), "gpu_hour_milli must be >= 0"),
        (Policy(interval_s=0), "interval_s must be from 1 to 3600"),
        (Policy(gpu_hour_milli_by_model={"A100": -3}), "gpu_hour_milli_by_model['A100']"),
        (Policy(admission_min_hours=-1), "admission_min_hours"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(policy: Policy, words: str) -> None:
    assert any(words in p for p in policy.problems())


# ---- the ledger ---------------------------------------------------------------------------------


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'nsml.sqlite'}")
    check_schema(database.engine, database.url)
    return database


def test_grants_move_the_balance_and_leave_ledger_and_audit_rows(db: Database) -> None:
    with db.session() as s:
        credits.grant(s, "alice", 5000, "welcome", "root", T0)
        credits.grant(s, "alice", -1500, "correction", "root", T0 + timedelta(minutes=1))
    with db.session() as s:
        assert credits.balance_milli(s, "alice") == 3500
        assert credits.ledger_balance_milli(s, "alice") == 3500
        rows = credits.history(s, "alice")
        assert [(r.amount_milli, r.kind, r.reason, r.actor) for r in rows] == [
            (-1500, "grant", "correction", "root"),
            (5000, "grant", "welcome", "root"),
        ]
        log = audit.recent(s)
        assert [(e.action, e.target, audit.detail_of(e)["amount_milli"]) for e in log] == [
            ("credits.grant", "user:alice", -1500),
            ("credits.grant", "user:alice", 5000),
        ]
        assert audit.recent(s, limit=10, before_id=log[0].id) == [log[1]]
        assert credits.mismatched_balances(s) == []


def test_a_deduction_past_the_balance_is_refused_and_writes_nothing(db: Database) -> None:
    with db.session() as s:
        credits.grant(s, "bob", 1000, "welcome", "root", T0)
    with pytest.raises(CreditError, match=r"has 1\.000 credits; deducting 2\.000"):
        with db.session() as s:
            credits.grant(s, "bob", -2000, "too much", "root", T0)
    with db.session() as s:
        assert credits.balance_milli(s, "bob") == 1000
        assert len(credits.history(s, "bob")) == 1
        assert len(audit.recent(s)) == 1


@pytest.mark.parametrize(
    ("amount", "reason", "words"),
    [(1000, "  ", "Give a reason"), (0, "x", "amount is zero")],
)
def test_bad_grants_are_refused(db: Database, amount: int, reason: str, words: str) -> None:
    with pytest.raises(CreditError, match=words), db.session() as s:
        credits.grant(s, "carol", amount, reason, "root", T0)


def test_team_pools_take_grants_and_an_unknown_team_is_404(db: Database) -> None:
    with db.session() as s:
        s.add(Team(name="vision", pays=True, credits_milli=0, created=T0))
        s.flush()
        credits.grant(s, "vision", 10_000, "quarter budget", "root", T0, team=True)
        assert credits.balance_milli(s, "vision", team=True) == 10_000
        assert credits.ledger_balance_milli(s, "vision", team=True) == 10_000
        assert credits.balance_milli(s, "vision") == 0  # no user of that name
    with pytest.raises(CreditError) as e, db.session() as s:
        credits.grant(s, "nope", 1, "x", "root", T0, team=True)
    assert e.value.status == 404


def test_a_balance_written_behind_the_ledgers_back_is_found(db: Database) -> None:
    with db.session() as s:
        credits.grant(s, "dave", 2000, "welcome", "root", T0)
        s.query(User).filter(User.name == "dave").update({"credits_milli": 99})
    with db.session() as s:
        assert credits.mismatched_balances(s) == [("user", "dave", 99, 2000)]


def test_the_opening_balance_is_a_ledger_grant(db: Database) -> None:
    with db.session() as s:
        credits.ensure_user(s, "erin", T0, 100_000)
        credits.ensure_user(s, "erin", T0, 100_000)  # second contact: nothing more
    with db.session() as s:
        assert credits.balance_milli(s, "erin") == 100_000
        assert [r.reason for r in credits.history(s, "erin")] == ["opening balance"]


def test_usage_by_day_sums_charges_per_day(db: Database) -> None:
    with db.session() as s:
        credits.ensure_user(s, "fay", T0, 50_000)
        for day, amount in ((0, 300), (0, 200), (2, 1000)):
            credits.post(
                s,
                account="fay",
                amount_milli=-amount,
                kind="charge",
                reason="test",
                actor="nsml",
                now=T0 + timedelta(days=day),
            )
        days = credits.usage_by_day(s, "fay", 4, T0 + timedelta(days=2))
    assert days == [
        (date(2026, 11, 30), 0),
        (date(2026, 12, 1), 500),
        (date(2026, 12, 2), 0),
        (date(2026, 12, 3), 1000),
    ]


def test_the_policy_defaults_until_set_and_the_change_is_audited(db: Database) -> None:
    with db.session() as s:
        assert credits.get_policy(s) == Policy()
        new = credits.policy_from_dict({"gpu_hour_milli": 2500, "interval_s": 30})
        credits.set_policy(s, new, "root", T0)
    with db.session() as s:
        assert credits.get_policy(s) == Policy(gpu_hour_milli=2500, interval_s=30)
        (entry,) = audit.recent(s)
        assert entry.action == "credits.policy"
        assert audit.detail_of(entry)["after"]["gpu_hour_milli"] == 2500
    with pytest.raises(CreditError, match="interval_s must be"), db.session() as s:
        credits.set_policy(s, Policy(interval_s=0), "root", T0)
    with pytest.raises(CreditError, match="Unknown policy field"):
        credits.policy_from_dict({"gpu_rate": 1})


def test_the_burn_rate_counts_what_runs_now(db: Database) -> None:
    with db.session() as s:
        credits.ensure_user(s, "gus", T0, 10_000)
        node = Node(name="n1", cpu_milli=8000, memory_mib=32768, created=T0)
        node.gpus = [
            Gpu(index=i, uuid=f"u{i}", model="A100", memory_total_mib=40000) for i in range(4)
        ]
        s.add(node)
        s.flush()
        for holder, gpus, state in (
            ("gus:session/mnist/1", [0, 1], "active"),
            ("gus:notebook", [2], "active"),
            ("gus:session/mnist/2", [3], "released"),
        ):
            s.add(
                Allocation(
                    holder=holder,
                    user_name="gus",
                    node_id=node.id,
                    gpu_indices=gpus,
                    gpu_milli_per_gpu=1000,
                    cpu_milli=1000,
                    memory_mib=1024,
                    state=state,
                    created=T0,
                )
            )
        s.flush()
        rate = credits.burn_rate_milli_per_hour(s, "gus", T0 + timedelta(minutes=5), policy=A100)
    assert rate == 3 * 3000
