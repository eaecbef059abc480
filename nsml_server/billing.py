"""Billing: the scheduling leader charges running work every billing interval, warns low
balances and stops work safely when credits run out.

What is charged is what holds resources: every *allocation* (a training session, an
evaluation, a notebook server) from its placement to its release, by the credit policy
(:mod:`nsml_server.credits`). Time is cut into intervals aligned on the epoch (the policy's
``interval_s``); an interval is charged once it has ended, for the part of it the allocation
held, as one ledger row keyed ``(allocation_id, interval_start)``. That key is unique in the
database, so:

- a pass that runs twice, a leader that restarts, or a standby that takes over charges no
  interval twice (an insert that meets the key is skipped, and only inserted rows move
  balances);
- nothing is skipped either: every pass charges *every* ended interval not yet charged
  (catch-up), back to ``max_catch_up_s`` before now.

After charging, an account (a user, or the team pool that pays for them) at or below the
policy's ``warn_threshold_milli`` is warned once (an event on each of its running sessions,
a ``notice`` on its users' open notebooks, e-mail when SMTP is configured). At zero or
below, its sessions that cost credits get a stop request with reason ``credits``: the
session runner sends SIGTERM, waits the stop grace for ``nsml.save``, and ends them
``stopped`` (reason ``credits``). Its evaluations that cost credits get ``stop_reason =
'credits'``: the evaluation runner sends SIGTERM, waits its stop grace, and ends them
``stopped`` (queued ones without running). Its GPU notebook servers are warned, then
stopped through the hub after ``notebook_grace_s`` (their files are kept).
Charges are in arrears, so what an account can overspend is at most one interval of what
it runs (plus the stop grace).

:func:`charge_pass` and :func:`enforce` are the domain functions (a transaction, a policy,
a time); :class:`CreditBilling` is the shell the server runs while it holds the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from traitlets import Bool, Float, Int, validate
from traitlets.config import LoggingConfigurable

from . import credits
from .credits import Policy, format_credits
from .db import Database
from .events import add_notice
from .models import (
    SESSION_ACTIVE_STATES,
    Allocation,
    CreditEntry,
    PlacementRequestRow,
    Submission,
    Team,
    TrainingSession,
    User,
    UserNotice,
)
from .notify import SMTPSettings, send
from .sessions import add_event

log = logging.getLogger("nsml_server.billing")

Account = tuple[bool, str]
"""``(team?, name)``: who pays."""

NOTICE_KEEP = timedelta(days=1)
"""How long a user notice is kept (the event stream sends only new ones)."""


@dataclass
class PassReport:
    """What one billing pass did."""

    allocations: int = 0
    charges: int = 0
    milli: int = 0
    skipped: int = 0  # intervals another pass had charged already (a standby, a restart)


def _holder_parts(holder: str) -> tuple[str, str]:
    """``("session" | "evaluation" | "notebook" | "other", rest)`` of an allocation holder
    (``user:session/ds/1``, ``user:evaluation/7``, ``user:notebook[:name]``)."""
    rest = holder.split(":", 1)[1] if ":" in holder else holder
    if rest.startswith("session/"):
        return "session", rest
    if rest.startswith("evaluation/"):
        return "evaluation", rest
    if rest == "notebook" or rest.startswith("notebook:"):
        return "notebook", rest.split(":", 1)[1] if ":" in rest else ""
    return "other", rest


def _insert(s: Session) -> Any:
    dialect = s.get_bind().dialect.name
    mod = postgresql if dialect == "postgresql" else sqlite
    return mod.insert(CreditEntry)


_MOVE_USER = (
    update(User)
    .where(User.name == bindparam("acct"))
    .values(credits_milli=User.credits_milli + bindparam("delta"))
)
_MOVE_TEAM = (
    update(Team)
    .where(Team.name == bindparam("acct"))
    .values(credits_milli=Team.credits_milli + bindparam("delta"))
)


LAST_WINDOW = 4
"""Intervals back from the horizon in which a pass looks for each allocation's newest
charge. An allocation not charged in that window (after a longer outage) is tried from
``max_catch_up_s`` back: the unique key skips what was charged, so nothing is charged twice;
it only costs that one pass more."""


def charge_pass(
    s: Session,
    policy: Policy,
    now: datetime,
    *,
    max_catch_up_s: float = 3600.0,
    actor: str = "billing",
) -> PassReport:
    """Charge every ended, uncharged billing interval of every allocation, in the caller's
    transaction. Safe to run concurrently and repeatedly: see the module's docstring."""
    step = timedelta(seconds=policy.interval_s)
    horizon = credits.interval_floor(now, policy.interval_s)  # intervals before it have ended
    oldest = credits.interval_floor(now - timedelta(seconds=max_catch_up_s), policy.interval_s)
    R = PlacementRequestRow
    allocs = s.execute(
        select(
            Allocation.id,
            Allocation.holder,
            Allocation.user_name,
            Allocation.node_id,
            func.json_array_length(Allocation.gpu_indices),
            Allocation.gpu_indices[0].as_integer(),
            Allocation.gpu_milli_per_gpu,
            Allocation.cpu_milli,
            Allocation.memory_mib,
            Allocation.created,
            Allocation.released,
            TrainingSession.id,
        )
        .outerjoin(R, R.allocation_id == Allocation.id)
        .outerjoin(TrainingSession, TrainingSession.placement_id == R.id)
        .where(
            Allocation.created < horizon,
            or_(Allocation.state == "active", Allocation.released > oldest),
        )
        # One order for every server: concurrent passes meet their rows in the same order
        # (no deadlock between two passes inserting the same keys).
        .order_by(Allocation.id)
    ).all()
    report = PassReport(allocations=len(allocs))
    if not allocs:
        return report
    models = credits.gpu_models(s)
    last: dict[int, datetime] = {}
    for aid, t in s.execute(
        select(CreditEntry.allocation_id, func.max(CreditEntry.interval_start))
        .where(
            CreditEntry.interval_start >= max(oldest, horizon - LAST_WINDOW * step),
            CreditEntry.allocation_id.is_not(None),
        )
        .group_by(CreditEntry.allocation_id)
    ):
        if aid is not None and t is not None:
            last[aid] = t
    # Who pays: the user, unless a team pays for them (only such users need a lookup).
    users = {
        u.name: u
        for u in s.execute(
            select(User.name, User.billing_team, User.groups).where(User.billing_team.is_not(None))
        )
    }
    pays = credits.teams_that_pay(s)
    charges: list[tuple[int, datetime, int, str | None, int | None]] = []
    about: dict[int, tuple[str, str]] = {}  # allocation id -> (user, holder)
    rates: dict[tuple[int, str | None, int, int], int] = {}
    for aid, holder, user, node_id, n_gpus, gpu0, milli, cpu, mem, created, released, sid in allocs:
        model = models.get((node_id, int(gpu0))) if n_gpus else None
        key = (int(n_gpus or 0) * int(milli or 0), model, int(cpu or 0), int(mem or 0))
        r = credits.Resources(*key)
        if rates.setdefault(key, credits.cost_per_hour_milli(policy, r)) == 0:
            continue  # free under this policy: no rows
        billed = users.get(user)
        team = credits.payer(billed, pays) if billed else None
        team_name = team[1] if team and team[0] else None
        start = max(credits.interval_floor(created, policy.interval_s), oldest)
        if aid in last:
            start = max(start, last[aid] + step)
        end_of_use = released or now
        k = start
        while k < horizon and k < end_of_use:
            held_from = max(k, created)
            held_to = min(k + step, end_of_use)
            if held_to > held_from:
                amount = credits.interval_charge_milli(
                    policy,
                    r,
                    (held_from - created).total_seconds(),
                    (held_to - created).total_seconds(),
                )
                charges.append((aid, k, -amount, team_name, sid))
                about[aid] = (user, holder)
            k += step
    if not charges:
        return report
    deltas: dict[Account, int] = defaultdict(int)
    inserted = _insert_charges(s, charges, about, actor, now)
    for kind_, account_, amount_ in inserted:
        deltas[(kind_ == "team", account_)] += int(amount_)
        report.milli -= int(amount_)
    report.charges = len(inserted)
    report.skipped = len(charges) - len(inserted)
    _move_balances(s, deltas)
    return report


def charge_labels(holder: str) -> tuple[str, str | None]:
    """``(reason, server name)`` of a charge for *holder*: the holder without its user
    (``session/mnist/3``, ``evaluation/7``, ``notebook``, ``notebook:gpu``), and the notebook
    server's name ('' the default; None when not a notebook server). The PostgreSQL path
    computes the same in SQL."""
    rest = holder.split(":", 1)[1] if ":" in holder else holder
    if rest == "notebook":
        return rest, ""
    if rest.startswith("notebook:"):
        return rest, rest[len("notebook:") :]
    return rest, None


# PostgreSQL: one statement for all rows, each column one array parameter (a multi-row
# VALUES of 10,000 rows costs more to build and parse than to run); what the allocation
# says (user, reason, server) is joined in SQL.
_PG_INSERT = text(
    """
    WITH d AS (
        SELECT * FROM unnest(
            CAST(:aid AS integer[]), CAST(:t AS bigint[]), CAST(:amount AS bigint[]),
            CAST(:team AS varchar[]), CAST(:sid AS integer[])
        ) AS d(aid, t, amount, team, sid)
    ), x AS (
        SELECT d.*, a.user_name,
               CASE WHEN position(':' in a.holder) > 0
                    THEN substr(a.holder, position(':' in a.holder) + 1)
                    ELSE a.holder END AS rest
        FROM d JOIN allocations a ON a.id = d.aid
    )
    INSERT INTO credit_ledger (account_kind, account, amount_milli, kind, reason, actor,
        user_name, session_id, server_name, allocation_id, interval_start, created)
    SELECT CASE WHEN x.team IS NULL THEN 'user' ELSE 'team' END,
           COALESCE(x.team, x.user_name), x.amount, 'charge', x.rest, :actor, x.user_name,
           x.sid,
           CASE WHEN x.rest = 'notebook' THEN ''
                WHEN x.rest LIKE 'notebook:%' THEN substr(x.rest, 10) END,
           x.aid, TIMESTAMP '1970-01-01' + x.t * INTERVAL '1 second', :created
    FROM x ORDER BY x.aid, x.t
    ON CONFLICT (allocation_id, interval_start) DO NOTHING
    RETURNING account_kind, account, amount_milli
    """
)
_PG_MOVE = {
    table: text(
        f"UPDATE {table} SET credits_milli = {table}.credits_milli + d.delta"
        " FROM unnest(CAST(:names AS varchar[]), CAST(:deltas AS bigint[])) AS d(name, delta)"
        f" WHERE {table}.name = d.name"
    )
    for table in ("users", "teams")
}


def _insert_charges(
    s: Session,
    charges: Sequence[tuple[int, datetime, int, str | None, int | None]],
    about: Mapping[int, tuple[str, str]],
    actor: str,
    now: datetime,
) -> list[Any]:
    """Insert the charges ``(allocation id, interval start, amount, paying team, session
    id)`` whose ``(allocation_id, interval_start)`` is new; return ``(account_kind, account,
    amount_milli)`` of each row inserted."""
    if s.get_bind().dialect.name == "postgresql":
        epoch = credits.EPOCH
        params = {
            "aid": [c[0] for c in charges],
            "t": [(c[1] - epoch) // timedelta(seconds=1) for c in charges],
            "amount": [c[2] for c in charges],
            "team": [c[3] for c in charges],
            "sid": [c[4] for c in charges],
            "actor": actor,
            "created": now,
        }
        return list(s.execute(_PG_INSERT, params).all())
    rows = []
    for aid, k, amount, team, sid in charges:
        user, holder = about[aid]
        reason, server = charge_labels(holder)
        rows.append(
            {
                "account_kind": "team" if team else "user",
                "account": team or user,
                "amount_milli": amount,
                "kind": "charge",
                "reason": reason,
                "actor": actor,
                "user_name": user,
                "session_id": sid,
                "server_name": server,
                "allocation_id": aid,
                "interval_start": k,
                "created": now,
            }
        )
    stmt = (
        _insert(s)
        .on_conflict_do_nothing(index_elements=["allocation_id", "interval_start"])
        .returning(CreditEntry.account_kind, CreditEntry.account, CreditEntry.amount_milli)
    )
    return list(s.execute(stmt, rows).all())


def _move_balances(s: Session, deltas: Mapping[Account, int]) -> None:
    """Add each delta to its account's cached balance (atomic ``+``, never a write of a
    value read before)."""
    pg = s.get_bind().dialect.name == "postgresql"
    for team, table_stmt in ((False, _MOVE_USER), (True, _MOVE_TEAM)):
        items = sorted((name, d) for (t, name), d in deltas.items() if t is team)
        if not items:
            continue
        if pg:
            s.execute(
                _PG_MOVE["teams" if team else "users"],
                {"names": [n for n, _ in items], "deltas": [d for _, d in items]},
            )
        else:
            s.connection().execute(table_stmt, [{"acct": n, "delta": d} for n, d in items])


# ---- warnings and safe stops ------------------------------------------------------------------


@dataclass
class Enforcement:
    """What :func:`enforce` decided: accounts warned, sessions asked to stop, notebook
    servers to warn or stop through the hub (``(user, server name)``)."""

    warned: list[Account] = field(default_factory=list)
    stopped_sessions: list[str] = field(default_factory=list)
    stopped_evaluations: list[int] = field(default_factory=list)  # submission ids
    notebooks_to_stop: list[tuple[str, str]] = field(default_factory=list)
    notebooks_warned: list[tuple[str, str]] = field(default_factory=list)
    mail: list[tuple[str, str, str]] = field(default_factory=list)  # (user, subject, text)


def enforce(
    s: Session,
    policy: Policy,
    now: datetime,
    *,
    notebook_warned_at: Mapping[tuple[str, str], datetime] | None = None,
    notebook_grace_s: float = 120.0,
) -> Enforcement:
    """Warn low accounts and stop the paid work of accounts at zero, in the caller's
    transaction. *notebook_warned_at* says when each GPU notebook server was warned (a
    server is stopped once it was warned at least *notebook_grace_s* ago)."""
    out = Enforcement()
    warned_at = dict(notebook_warned_at or {})
    # Only accounts at or below the warning threshold can need anything: find them first
    # (usually few), then look only at their users' work.
    low: dict[Account, tuple[int, bool]] = {}
    for team, table in ((False, User), (True, Team)):
        for name, bal, flag in s.execute(
            select(table.name, table.credits_milli, table.credits_warned).where(
                table.credits_milli <= policy.warn_threshold_milli
            )
        ):
            low[(team, name)] = (int(bal), bool(flag))
    if not low:
        return out
    pays = credits.teams_that_pay(s)
    billed = {
        u.name: u
        for u in s.execute(
            select(User.name, User.billing_team, User.groups).where(User.billing_team.is_not(None))
        )
    }

    def account_for(name: str) -> Account:
        return credits.payer(billed.get(name), pays) or (False, name)

    candidates = sorted(
        {n for t, n in low if not t and account_for(n) == (False, n)}
        | {n for n in billed if account_for(n) in low}
    )
    if not candidates:
        return out
    models = credits.gpu_models(s)
    live: list[Allocation] = []
    queued: list[TrainingSession] = []
    for i in range(0, len(candidates), 5000):
        chunk = candidates[i : i + 5000]
        live += s.scalars(
            select(Allocation).where(Allocation.state == "active", Allocation.user_name.in_(chunk))
        )
        queued += s.scalars(
            select(TrainingSession).where(
                TrainingSession.state.in_(SESSION_ACTIVE_STATES),
                TrainingSession.stop_requested.is_(False),
                TrainingSession.user_name.in_(chunk),
            )
        )
    account_of = {n: account_for(n) for n in candidates}
    balances = {acct: bal for acct, (bal, _) in low.items()}
    warned_flag = {acct: flag for acct, (_, flag) in low.items()}
    paid_users: set[str] = set()
    for a in live:
        if credits.cost_per_hour_milli(policy, credits.allocation_resources(a, models)) > 0:
            paid_users.add(a.user_name)
    for r in queued:
        if r.state == "queued" and credits.cost_per_hour_milli(policy, _resources(r)) > 0:
            paid_users.add(r.user_name)
    sessions_of: dict[str, list[TrainingSession]] = defaultdict(list)
    for r in queued:
        sessions_of[r.user_name].append(r)
    # warnings, once per crossing (a grant re-arms them)
    for account in sorted({account_of[n] for n in paid_users}):
        bal = balances.get(account, 0)
        if bal > policy.warn_threshold_milli or warned_flag.get(account):
            continue
        table = Team if account[0] else User
        moved = s.execute(
            update(table)
            .where(table.name == account[1], table.credits_warned.is_(False))
            .values(credits_warned=True)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if not moved:
            continue
        out.warned.append(account)
        who = f"team {account[1]}'s pool" if account[0] else "your balance"
        notice = (
            f"Credits low: {who} is {format_credits(bal)} credits. At zero, sessions that "
            "use credits are stopped (SIGTERM, then the grace period to save)."
        )
        for n in sorted(n for n in paid_users if account_of[n] == account):
            for r in sessions_of.get(n, []):
                add_event(s, r, "notice", notice, now)
            out.mail.append((n, "[nsml] credits low", notice))
        log.info("credits: %s %s low (%s); warned", *_who(account), format_credits(bal))
    # stops at zero
    broke = {n for n in paid_users if balances.get(account_of[n], 0) <= 0}
    for n in sorted(broke):
        for r in sessions_of.get(n, []):
            if r.state != "queued":
                alloc_cost = _session_cost(r, live, models, policy)
                if alloc_cost == 0:
                    continue
            elif credits.cost_per_hour_milli(policy, _resources(r)) == 0:
                continue
            moved = s.execute(
                update(TrainingSession)
                .where(
                    TrainingSession.id == r.id,
                    TrainingSession.state.in_(SESSION_ACTIVE_STATES),
                    TrainingSession.stop_requested.is_(False),
                )
                .values(stop_requested=True, reason="credits")
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if moved:
                account = account_of[n]
                add_event(
                    s,
                    r,
                    "notice",
                    f"stopping: out of credits ({'team ' + account[1] if account[0] else n} at "
                    f"{format_credits(balances.get(account, 0))}); SIGTERM, then the grace "
                    "period for nsml.save",
                    now,
                )
                out.stopped_sessions.append(r.name)
                log.warning("%s: out of credits; stopping", r.name)
        out.stopped_evaluations += _stop_evaluations(s, n, live, models, policy)
        for a in live:
            kind, server = _holder_parts(a.holder)
            if a.user_name != n or kind != "notebook":
                continue
            if credits.cost_per_hour_milli(policy, credits.allocation_resources(a, models)) == 0:
                continue
            key = (n, server)
            first = warned_at.get(key)
            if first is None:
                out.notebooks_warned.append(key)
                out.mail.append(
                    (
                        n,
                        "[nsml] notebook server stopping: out of credits",
                        f"Your notebook server {server or '(default)'} holds GPUs and your "
                        f"credits ran out; it stops in {notebook_grace_s:.0f} s (your files "
                        "are kept). Ask an admin for credits, or restart it without GPUs.",
                    )
                )
            elif (now - first).total_seconds() >= notebook_grace_s:
                out.notebooks_to_stop.append(key)
    return out


def _stop_evaluations(
    s: Session,
    user: str,
    live: Sequence[Allocation],
    models: Mapping[tuple[int, int], str],
    policy: Policy,
) -> list[int]:
    """Ask the evaluation runner to stop *user*'s evaluations that cost credits (reason
    ``credits``); the ids of those newly asked."""
    held: dict[int, Allocation] = {}
    for alloc in live:
        kind, rest = _holder_parts(alloc.holder)
        number = rest[len("evaluation/") :]
        if alloc.user_name == user and kind == "evaluation" and number.isdigit():
            held[int(number)] = alloc
    stopped: list[int] = []
    for sub in s.scalars(
        select(Submission).where(
            Submission.user_name == user,
            Submission.state.in_(("queued", "running")),
            Submission.stop_reason.is_(None),
        )
    ):
        a = held.get(sub.id)
        r = (
            credits.allocation_resources(a, models)
            if a is not None
            else _resources_of(sub.resources or {})
        )
        if credits.cost_per_hour_milli(policy, r) == 0:
            continue
        moved = s.execute(
            update(Submission)
            .where(
                Submission.id == sub.id,
                Submission.state.in_(("queued", "running")),
                Submission.stop_reason.is_(None),
            )
            .values(stop_reason="credits")
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if moved:
            stopped.append(sub.id)
            log.warning("submission %d (%s): out of credits; stopping", sub.id, user)
    return stopped


def _who(account: Account) -> tuple[str, str]:
    return ("team" if account[0] else "user", account[1])


def _resources(row: TrainingSession) -> credits.Resources:
    """The resources a (queued) session asks for."""
    return _resources_of(row.resources or {})


def _resources_of(r: Mapping[str, Any]) -> credits.Resources:
    """The resources a stored ask (a session's or an evaluation's ``resources``) names."""
    models = r.get("gpu_models") or []
    return credits.Resources(
        gpu_milli=int(r.get("gpu_milli", 0) or 0),
        gpu_model=models[0] if len(models) == 1 else None,
        cpu_milli=int(r.get("cpu_milli", 0) or 0),
        memory_mib=int(r.get("memory_mib", 0) or 0),
    )


def _session_cost(
    row: TrainingSession,
    live: Sequence[Allocation],
    models: Mapping[tuple[int, int], str],
    policy: Policy,
) -> int:
    holder = f"{row.user_name}:session/{row.dataset_key}/{row.number}"
    for a in live:
        if a.holder == holder:
            return credits.cost_per_hour_milli(policy, credits.allocation_resources(a, models))
    return credits.cost_per_hour_milli(policy, _resources(row))


# ---- the shell ------------------------------------------------------------------------------


StopServer = Callable[[str, str], Awaitable[None]]
"""Stops user *name*'s notebook server *server* ('' the default) through the hub."""


class CreditBilling(LoggingConfigurable):
    """Charges credits for running work, warns and stops, while this server leads.

    The billing interval and the rates are the credit policy's (``PUT api/credits/policy``);
    these settings say how the server applies them.
    """

    enabled = Bool(
        True,
        help="""Charge credits for running work (and stop it when they run out). When
        False, nothing is charged, warned or stopped; balances and grants still work.""",
    ).tag(config=True)

    max_catch_up_s = Float(
        3600.0,
        help="""Seconds back from now that a billing pass charges intervals nobody charged
        (a leader that was down, a standby that took over). Longer outages are not billed
        beyond this. Default one hour; it must be longer than the lease's time to live.""",
    ).tag(config=True)

    notebook_grace_s = Float(
        120.0,
        help="""Seconds between the warning to a GPU notebook server whose credits ran out
        and its stop (files are kept). Default 120.""",
    ).tag(config=True)

    poll_s = Float(
        0.0,
        help="""Seconds between billing passes; 0 (default) runs a pass just after each
        billing interval of the policy ends. A pass charges every ended interval, so a
        longer period bills the same, later.""",
    ).tag(config=True)

    recheck_s = Float(
        5.0,
        help="""Most seconds between looks at the credit policy (a changed billing interval
        takes effect within this time). A pass runs only when an interval has ended.""",
    ).tag(config=True)

    stop_batch = Int(
        200, help="Most notebook servers stopped through the hub at once (a semaphore)."
    ).tag(config=True)

    @validate("max_catch_up_s", "notebook_grace_s", "poll_s", "recheck_s")
    def _nonnegative(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value < 0:
            raise ValueError(
                f"{proposal['trait'].name}={value} must be >= 0 (seconds); e.g. "
                f"{proposal['trait'].default_value}."
            )
        return value

    def __init__(
        self,
        db: Database | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        now: Callable[[], datetime] = datetime.utcnow,
        stop_server: StopServer | None = None,
        smtp: SMTPSettings | None = None,
        wake_runner: Callable[[], None] = lambda: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.db = db
        self.is_leader = is_leader
        self.now = now
        self.stop_server = stop_server
        self.smtp = smtp or SMTPSettings()
        self.wake_runner = wake_runner
        self.notebook_warned_at: dict[tuple[str, str], datetime] = {}
        self.last_report: PassReport | None = None

    def tick(self) -> tuple[PassReport, Enforcement]:
        """One billing pass and its enforcement, each in its own transaction."""
        assert self.db is not None
        now = self.now()
        with self.db.session() as s:
            policy = credits.get_policy(s)
            report = charge_pass(s, policy, now, max_catch_up_s=self.max_catch_up_s)
        with self.db.session() as s:
            decided = enforce(
                s,
                policy,
                now,
                notebook_warned_at=self.notebook_warned_at,
                notebook_grace_s=self.notebook_grace_s,
            )
            # What is mailed also reaches the user's open notebooks, through the stream of
            # whichever server process serves them, once this transaction commits.
            for user, subject, words in decided.mail:
                add_notice(s, user, subject.removeprefix("[nsml] "), words, now)
            s.execute(delete(UserNotice).where(UserNotice.created < now - NOTICE_KEEP))
        for key in decided.notebooks_warned:
            self.notebook_warned_at[key] = now
        if report.charges:
            log.info(
                "billing: %d intervals charged (%s credits) over %d allocations; %d already "
                "charged",
                report.charges,
                format_credits(report.milli),
                report.allocations,
                report.skipped,
            )
        self.last_report = report
        if decided.stopped_sessions:
            self.wake_runner()
        return report, decided

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until *stop* is set, while this server leads: one pass after each
        billing interval ends (the policy is read again at least every ``recheck_s``, so a
        new interval takes effect at once)."""
        loop = asyncio.get_running_loop()
        last_horizon: datetime | None = None
        while not stop.is_set():
            interval = 60
            try:
                if self.db is not None:
                    with self.db.session() as s:
                        interval = credits.get_policy(s).interval_s
                horizon = credits.interval_floor(self.now(), interval)
                due = self.poll_s > 0 or horizon != last_horizon
                if due and self.enabled and self.is_leader() and self.db is not None:
                    _report, decided = await loop.run_in_executor(None, self.tick)
                    last_horizon = horizon
                    await self._act(decided)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("billing pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._delay(interval))

    def _delay(self, interval_s: int) -> float:
        if self.poll_s:
            return self.poll_s
        now = self.now()
        nxt = credits.interval_floor(now, interval_s) + timedelta(seconds=interval_s)
        return min(max(self.recheck_s, 0.2), max(0.2, (nxt - now).total_seconds() + 0.2))

    async def _act(self, decided: Enforcement) -> None:
        """Mail and notebook stops, off the database transaction."""
        loop = asyncio.get_running_loop()
        if self.smtp.enabled:
            for user, subject, words in decided.mail:
                await loop.run_in_executor(None, self._mail, user, subject, words)
        if self.stop_server is None:
            for user, server in decided.notebooks_to_stop:
                log.warning(
                    "%s's notebook server %r is out of credits; no hub to stop it", user, server
                )
            return
        sem = asyncio.Semaphore(self.stop_batch)

        async def one(user: str, server: str) -> None:
            async with sem:
                try:
                    assert self.stop_server is not None
                    await self.stop_server(user, server)
                    log.warning("%s's notebook server %r stopped: out of credits", user, server)
                    self.notebook_warned_at.pop((user, server), None)
                except Exception as e:
                    log.error("could not stop %s's notebook server %r: %s", user, server, e)

        await asyncio.gather(*(one(u, n) for u, n in decided.notebooks_to_stop))

    def _mail(self, user: str, subject: str, words: str) -> None:
        msg = EmailMessage()
        msg["From"] = self.smtp.sender
        msg["To"] = self.smtp.to_template.format(user=user)
        msg["Subject"] = subject
        msg.set_content(words + "\n")
        try:
            send(self.smtp, msg)
        except Exception as e:
            log.warning("could not mail %s: %s", msg["To"], e)


def hub_server_stopper(api_url: str, token: str) -> StopServer:
    """A :data:`StopServer` that asks the hub's REST API (the service needs the
    ``delete:servers`` scope): ``DELETE users/NAME/server`` or ``users/NAME/servers/SERVER``."""
    from urllib.parse import quote

    from tornado.httpclient import AsyncHTTPClient, HTTPClientError

    base = api_url.rstrip("/") + "/"

    async def stop(user: str, server: str) -> None:
        path = f"users/{quote(user, safe='')}/" + (
            f"servers/{quote(server, safe='')}" if server else "server"
        )
        try:
            await AsyncHTTPClient().fetch(
                base + path,
                method="DELETE",
                headers={"Authorization": f"token {token}"},
                request_timeout=30,
            )
        except HTTPClientError as e:
            if e.code not in (202, 204, 400, 404):  # 400/404: not running any more
                raise

    return stop
