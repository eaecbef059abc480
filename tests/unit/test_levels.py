"""Permission levels, limits, teams and admission of new work, without a server."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from nsml_server import audit, credits, levels
from nsml_server.credits import CreditError, Policy
from nsml_server.db import Database, check_schema
from nsml_server.levels import Limits, credit_refusal, effective_limits
from nsml_server.models import Allocation, Node, TrainingSession, User

T0 = datetime(2026, 12, 1, 9, 0, 0)


@pytest.mark.parametrize(
    ("name", "level", "overrides", "limits"),
    [
        ("no overrides: the level's", Limits(4, 2, 5), {}, Limits(4, 2, 5)),
        ("each override wins", Limits(4, 2, 5), {"max_gpus": 8}, Limits(8, 2, 5)),
        (
            "an override of zero is a cap",
            Limits(None, None, 0),
            {"max_running": 0},
            Limits(None, 0, 0),
        ),
        ("priority alone", Limits(1, 1, 0), {"priority": -3}, Limits(1, 1, -3)),
    ],
)
def test_user_overrides_win_over_their_level(
    name: str, level: Limits, overrides: dict[str, int], limits: Limits
) -> None:
    user = User(name="u", **overrides)
    assert effective_limits(level, user) == limits, name


@pytest.mark.parametrize(
    ("balance", "per_hour", "min_hours", "words"),
    [
        (100_000, 60_000, 0.25, None),  # covers 15 minutes
        (15_000, 60_000, 0.25, None),  # exactly
        (
            5_000,
            60_000,
            0.25,
            "the balance is 5.000 credits and it costs 60.000 credits an hour, "
            "so it would run about 5 min; starting needs 15 min of it (15.000 credits)",
        ),
        (0, 120_000, 0.0, "the balance is 0.000 credits"),  # nothing left, minimum zero
        (-50, 0, 1.0, None),  # free work starts whatever the balance
    ],
)
def test_the_credit_refusal_gives_balance_cost_and_time(
    balance: int, per_hour: int, min_hours: float, words: str | None
) -> None:
    why = credit_refusal(balance, per_hour, min_hours, "this session")
    if words is None:
        assert why is None
    else:
        assert why is not None and words in why


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'nsml.sqlite'}")
    check_schema(database.engine, database.url)
    with database.session() as s:
        s.add(Node(name="n1", cpu_milli=8000, memory_mib=32000, created=T0))
    return database


def hold(db: Database, user: str, gpus: int) -> None:
    with db.session() as s:
        node = s.scalar(select(Node))
        assert node is not None
        s.add(
            Allocation(
                holder=f"{user}:notebook",
                user_name=user,
                node_id=node.id,
                gpu_indices=list(range(gpus)),
                gpu_milli_per_gpu=1000,
                created=T0,
            )
        )


def test_a_launch_the_balance_cannot_cover_is_refused_with_402(db: Database) -> None:
    with db.session() as s:
        credits.ensure_user(s, "alice", T0, 10_000)
    with pytest.raises(CreditError) as e, db.session() as s:
        levels.admit(s, "alice", {"gpu_milli": 2000}, "this session", T0, policy=Policy())
    assert e.value.status == 402 and e.value.reason == "insufficient_credits"
    assert "costs 120.000 credits an hour, so it would run about 5 min" in e.value.message
    with db.session() as s:  # without GPUs it costs nothing under the default policy
        assert levels.admit(s, "alice", {"cpu_milli": 1000}, "this session", T0) == 0


def test_level_limits_refuse_more_gpus_or_sessions_with_403(db: Database) -> None:
    with db.session() as s:
        credits.ensure_user(s, "bob", T0, 10_000_000)
        levels.set_level_limits(s, "user", Limits(max_gpus=2, max_running=1), "root", T0)
    hold(db, "bob", 1)
    with pytest.raises(CreditError, match="allows 2 GPUs at once; you hold 1") as e:
        with db.session() as s:
            levels.admit(s, "bob", {"gpu_milli": 2000}, "this session", T0)
    assert e.value.status == 403
    with db.session() as s:
        s.add(
            TrainingSession(
                name="bob/_/1",
                user_name="bob",
                dataset_key="_",
                number=1,
                code_digest="0" * 64,
                entry="a.py",
                image="i",
                created=T0,
            )
        )
    with pytest.raises(CreditError, match="allows 1 active sessions"), db.session() as s:
        levels.admit(s, "bob", {}, "this session", T0)
    with db.session() as s:  # an evaluation is not a session; an admin override lifts it
        assert levels.admit(s, "bob", {}, "x", T0, counts_as_session=False) == 0
        levels.set_user_level(
            s, "bob", "root", T0, level="team_admin", overrides={"max_running": 5}
        )
    with db.session() as s:
        assert levels.admit(s, "bob", {}, "this session", T0) == 5
        assert levels.queue_priority(s, "bob") == 5
        assert [e.action for e in audit.recent(s)] == ["levels.user", "levels.limits"]


def test_a_billing_team_must_exist_and_count_the_user_as_member(db: Database) -> None:
    with db.session() as s:
        levels.set_team(s, "vision", "root", T0, pays=True)
        credits.ensure_user(s, "carol", T0).groups = ["nlp"]
    with pytest.raises(CreditError, match="not in the hub group"), db.session() as s:
        levels.set_billing_team(s, "carol", "vision", "root", T0)
    with pytest.raises(CreditError, match="No team named"), db.session() as s:
        levels.set_billing_team(s, "carol", "nope", "root", T0)
    with db.session() as s:
        user = s.scalar(select(User).where(User.name == "carol"))
        assert user is not None
        user.groups = ["nlp", "vision"]
        levels.set_billing_team(s, "carol", "vision", "root", T0)
        levels.set_team_admin(s, "vision", "carol", True, "root", T0)
    with db.session() as s:
        assert levels.team_admins(s, "vision") == ["carol"]
        # the team's empty pool now refuses carol's GPU work, naming the pool
        with pytest.raises(CreditError, match=r"team vision's pool has 0\.000"):
            levels.admit(s, "carol", {"gpu_milli": 1000}, "this session", T0)


def test_unknown_levels_are_refused_listing_the_valid_ones(db: Database) -> None:
    with pytest.raises(CreditError, match="valid: user, team_admin, admin"), db.session() as s:
        levels.set_user_level(s, "dave", "root", T0, level="boss")
