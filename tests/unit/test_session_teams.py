"""Team sessions and per-session credit figures: who reads a team session, what a session
has cost and costs per hour, and a list's figures read without a query per session."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from nsml_server import credits
from nsml_server.artifacts import may_run_code
from nsml_server.billing import CreditBilling
from nsml_server.credits import Policy
from nsml_server.db import Database, check_schema
from nsml_server.models import Allocation, Gpu, Node, Team, TrainingSession
from nsml_server.sessions import SessionError, session_out, session_outs, session_team
from tests.unit.rows import hold, placed

T0 = datetime(2026, 12, 1, 9, 0, 0)
POLICY = Policy(gpu_hour_milli=60_000, cpu_hour_milli=0, memory_gb_hour_milli=0, interval_s=60)


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


# ---- which team a new session gets --------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "visibility", "team", "billing", "expected"),
    [
        ("no team, nobody pays: private", None, None, None, ("private", None)),
        ("the billing team pays: a team session of it", None, None, "vision", ("team", "vision")),
        ("--team names one of the caller's groups", None, "speech", None, ("team", "speech")),
        ("--team wins over the billing team", None, "speech", "vision", ("team", "speech")),
        ("--private wins over the billing team", "private", None, "vision", ("private", None)),
        ("--public keeps the billing team for its admins", "public", None, "vision",
         ("public", "vision")),
        ("--public without a team", "public", None, None, ("public", None)),
        ("visibility team with the billing team", "team", None, "vision", ("team", "vision")),
    ],
)  # fmt: skip
def test_a_new_session_s_team(
    case: str,
    visibility: str | None,
    team: str | None,
    billing: str | None,
    expected: tuple[str, str | None],
) -> None:
    assert session_team(visibility, team, ["vision", "speech"], billing) == expected, case


@pytest.mark.parametrize(
    ("case", "visibility", "team", "status", "words"),
    [
        (
            "a team the caller is not in",
            None,
            "audio",
            403,
            "not a member of team 'audio' (a JupyterHub group); your groups: speech, vision",
        ),
        ("private with a team", "private", "vision", 400, "A private session has no team"),
        ("visibility team without any team", "team", None, 400, "--team TEAM"),
    ],
)
def test_a_new_session_s_team_refused(
    case: str, visibility: str | None, team: str | None, status: int, words: str
) -> None:
    with pytest.raises(SessionError) as e:
        session_team(visibility, team, ["vision", "speech"], None)
    assert e.value.status == status, case
    assert words in e.value.message, case


def test_a_hub_admin_may_name_any_team() -> None:
    assert session_team(None, "audio", [], None, is_admin=True) == ("team", "audio")


# ---- the database side ------------------------------------------------------------------------


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'nsml.sqlite'}")
    check_schema(database.engine, database.url)
    with database.session() as s:
        credits.set_policy(s, POLICY, "root", T0 - timedelta(days=1))
        node = Node(name="n1", cpu_milli=64000, memory_mib=256000, created=T0)
        node.gpus = [Gpu(index=i, uuid=f"g{i}", model="A100") for i in range(8)]
        s.add(node)
        for name in ("alice", "bob"):
            credits.ensure_user(s, name, T0 - timedelta(days=1), 1_000_000)
    return database


def add_session(
    db: Database,
    user: str,
    number: int,
    gpus: list[int] | None,
    start: datetime,
    *,
    visibility: str = "private",
    team: str | None = None,
    code: str = "0" * 64,
) -> int:
    """A session of *user*: running on *gpus* since *start*, or queued (None)."""
    with db.session() as s:
        pid = None
        if gpus is not None:
            pid = placed(s, hold(s, user, f"{user}:session/mnist/{number}", gpus, start))
        row = TrainingSession(
            name=f"{user}/mnist/{number}",
            user_name=user,
            dataset_key="mnist",
            number=number,
            state="running" if gpus is not None else "queued",
            visibility=visibility,
            team=team,
            code_digest=code,
            entry="main.py",
            image="img",
            resources={"gpus": len(gpus or []), "gpu_milli": 1000 * len(gpus or [])},
            placement_id=pid,
            created=start,
            started=start if gpus is not None else None,
        )
        s.add(row)
        s.flush()
        return row.id


def test_a_team_session_s_code_may_be_run_by_its_team_only(db: Database) -> None:
    add_session(db, "alice", 1, None, T0, visibility="team", team="vision", code="c" * 64)
    with db.session() as s:
        assert may_run_code(s, "bob", False, "c" * 64, ["vision"])
        assert not may_run_code(s, "bob", False, "c" * 64, ["speech"])
        assert not may_run_code(s, "bob", False, "c" * 64)


def test_a_session_s_credits_used_and_rate_follow_the_ledger_and_the_policy(
    db: Database,
) -> None:
    sid = add_session(db, "alice", 1, [0, 1], T0)
    clock = Clock(T0)
    billing = CreditBilling(db, now=clock)
    for _ in range(10):
        clock.t += timedelta(seconds=60)
        billing.tick()
    with db.session() as s:
        row = s.get(TrainingSession, sid)
        assert row is not None
        out = session_out(s, row, clock.t)
    # 2 GPUs x 60 credits an hour: 120 an hour, 2 a minute, 10 ended minutes charged.
    assert out.credit_rate == 120.0
    assert out.credits_used == 20.0
    with db.session() as s:
        assert credits.user_burn_rate_milli_per_hour(s, "alice", clock.t) == 120_000
        assert credits.user_burn_rate_milli_per_hour(s, "bob", clock.t) == 0
        a = s.scalar(select(Allocation))
        assert a is not None
        a.state, a.released = "released", clock.t
        s.flush()
        row = s.get(TrainingSession, sid)
        assert row is not None
        row.state = "stopped"
        out = session_out(s, row, clock.t)
        assert credits.user_burn_rate_milli_per_hour(s, "alice", clock.t) == 0
    assert out.credit_rate is None  # holds nothing any more
    assert out.credits_used == 20.0


def test_a_queued_session_has_no_rate_and_has_used_nothing(db: Database) -> None:
    sid = add_session(db, "alice", 1, None, T0)
    with db.session() as s:
        row = s.get(TrainingSession, sid)
        assert row is not None
        out = session_out(s, row, T0)
    assert (out.credits_used, out.credit_rate) == (0.0, None)


def test_a_list_reads_its_credit_figures_in_the_same_queries_for_3_or_30_sessions(
    db: Database,
) -> None:
    def statements(n: int) -> int:
        with db.session() as s:
            rows = list(s.scalars(select(TrainingSession).where(TrainingSession.number <= n)))
            assert len(rows) == n
            seen: list[Any] = []

            def count(*_a: Any) -> None:
                seen.append(1)

            engine = s.get_bind()
            event.listen(engine, "before_cursor_execute", count)
            try:
                outs = session_outs(s, rows, T0 + timedelta(minutes=5))
            finally:
                event.remove(engine, "before_cursor_execute", count)
            assert all(o.credit_rate == 60.0 for o in outs)
            return len(seen)

    for n in range(1, 31):
        add_session(db, "alice", n, [n % 8], T0)
    assert statements(3) == statements(30)


def test_the_paying_team_is_the_billing_team_only_while_it_pays_and_holds_the_user(
    db: Database,
) -> None:
    with db.session() as s:
        s.add(Team(name="vision", pays=True, credits_milli=0, created=T0))
        s.flush()
        user = credits.ensure_user(s, "alice", T0)
        user.billing_team = "vision"
        s.flush()
        assert credits.paying_team(s, "alice", ["vision"]) == "vision"
        assert credits.paying_team(s, "alice", ["speech"]) is None  # left the group
        assert credits.paying_team(s, "bob", ["vision"]) is None  # no billing team
        team = s.scalar(select(Team).where(Team.name == "vision"))
        assert team is not None
        team.pays = False
        s.flush()
        assert credits.paying_team(s, "alice", ["vision"]) is None


# ---- who manages a team's members -------------------------------------------------------------


def test_only_admins_and_the_team_s_team_admins_manage_its_members(db: Database) -> None:
    from nsml_server import levels
    from nsml_server.models import AuditEntry, User
    from nsml_server.teams import TeamError, may_manage, record_member_change

    with db.session() as s:
        levels.set_team(s, "vision", "root", T0)
        levels.set_team_admin(s, "vision", "vic", True, "root", T0)
        may_manage(s, "vision", "vic", hub_admin=False)
        may_manage(s, "vision", "root", hub_admin=True)
        for user, status in (("mia", 403), ("eve", 403)):
            with pytest.raises(TeamError) as e:
                may_manage(s, "vision", user, hub_admin=False)
            assert e.value.status == status
            assert "team admin of team vision" in e.value.message
        with pytest.raises(TeamError) as e:
            may_manage(s, "audio", "root", hub_admin=True)
        assert (e.value.status, e.value.reason) == (404, "not_found")
        record_member_change(s, "vision", "alice", True, "vic", T0)
        record_member_change(s, "vision", "nobody-seen", True, "vic", T0)
        alice = s.scalar(select(User).where(User.name == "alice"))
        assert alice is not None and alice.groups == ["vision"]
        assert s.scalar(select(User).where(User.name == "nobody-seen")) is None
        record_member_change(s, "vision", "alice", False, "vic", T0)
        assert alice.groups == []
        rows = [
            (a.actor, a.action, a.target)
            for a in s.scalars(select(AuditEntry).where(AuditEntry.action.like("teams.member%")))
        ]
    assert rows == [
        ("vic", "teams.member.add", "team:vision"),
        ("vic", "teams.member.add", "team:vision"),
        ("vic", "teams.member.remove", "team:vision"),
    ]


# ---- migration 0012 -----------------------------------------------------------------------------


def test_migration_0012_round_trips_keeping_sessions_and_their_events(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import text

    from nsml_server.db import alembic_config

    url = f"sqlite:///{tmp_path / 'm.sqlite'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "0011")
    database = Database(url)
    with database.engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO sessions (id, name, user_name, dataset_key, number, state,"
                " visibility, code_digest, entry, args, image, datasets, resources, gpu_ids,"
                " log_base, stop_requested, attempt, memo, last_metrics, points, created,"
                " restart_on_lost) VALUES (1, 'a/_/1', 'a', '_', 1, 'completed', 'public', 'x',"
                " 't.py', '[]', 'img', '[]', '{}', '[]', 0, 0, 1, '', '{}', 0, '2026-01-01', 0)"
            )
        )
        c.execute(
            text(
                "INSERT INTO session_events (session_id, session_name, user_name, kind,"
                " message, created) VALUES (1, 'a/_/1', 'a', 'state', 'x', '2026-01-01')"
            )
        )
    command.upgrade(cfg, "head")
    with database.engine.begin() as c:
        assert c.execute(text("SELECT visibility, team FROM sessions")).all() == [("public", None)]
        c.execute(text("UPDATE sessions SET visibility = 'team', team = 'vision'"))
    command.downgrade(cfg, "0011")
    with database.engine.begin() as c:
        assert c.execute(text("SELECT visibility FROM sessions")).all() == [("private",)]
        assert c.execute(text("SELECT count(*) FROM session_events")).scalar() == 1
    command.upgrade(cfg, "head")
    database.dispose()
