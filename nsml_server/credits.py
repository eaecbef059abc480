"""Credits: the ledger, balances, the policy and the cost of resources over time.

NSML's account model: admins give users (or a team's pool) credits; running work consumes
them by the credit policy; when they run out, work stops safely and no new work starts
(:mod:`nsml_server.billing` charges and stops; admission checks live in
:mod:`nsml_server.levels`).

Money is integers: thousandths of a credit (*milli*). Every change of a balance is one row of
the append-only ``credit_ledger`` (grant, charge, refund: who, when, why, for which session,
server or allocation) written in the same transaction as an atomic ``UPDATE ... SET
credits_milli = credits_milli + :amount`` of the cached balance, never a read-modify-write,
so that concurrent grants and charges (several server processes, many writers) never lose an
update. :func:`ledger_balance_milli` recomputes a balance from the ledger;
:func:`mismatched_balances` lists every account whose cache disagrees (none, ever).

The pure part (:class:`Policy`, :class:`Resources`, :func:`cost_milli`,
:func:`interval_charge_milli`, :func:`interval_floor`, :func:`hours_left`) takes plain values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import audit
from .models import (
    Allocation,
    CreditEntry,
    CreditPolicyRow,
    Gpu,
    PlacementRequestRow,
    Team,
    User,
)

log = logging.getLogger("nsml_server.credits")

MILLI = 1000
"""Thousandths of a credit per credit."""

_SCALE = 1000 * 1024
"""Rates are per GPU (1000 milli-GPU), per CPU (1000 milli-CPU), per GiB (1024 MiB)."""

EPOCH = datetime(1970, 1, 1)


class CreditError(Exception):
    """A credit operation that cannot be done: *message* says why and what to do."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason


# ---- the pure part --------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The credit policy. Rates are thousandths of a credit per hour of one unit.

    - ``gpu_hour_milli``: per GPU-hour, for models not in ``gpu_hour_milli_by_model``
      (a GPU share pays its fraction: half a GPU, half the rate); default 60 credits, one
      credit per GPU-minute (so the server's ``default_credits`` of 100 buy 100 GPU-minutes);
    - ``cpu_hour_milli``: per CPU-hour (1000 milli-CPU); ``memory_gb_hour_milli``: per GiB-hour;
    - ``interval_s``: the billing interval; intervals are aligned on the epoch so that every
      server cuts time at the same instants;
    - ``warn_threshold_milli``: a balance at or below it gets one warning;
    - ``admission_min_hours``: new work is refused unless the balance covers this many hours
      of it.
    """

    gpu_hour_milli: int = 60_000
    gpu_hour_milli_by_model: Mapping[str, int] = field(default_factory=dict)
    cpu_hour_milli: int = 0
    memory_gb_hour_milli: int = 0
    interval_s: int = 60
    warn_threshold_milli: int = 1000
    admission_min_hours: float = 0.25

    def gpu_rate_milli(self, model: str | None) -> int:
        """The GPU-hour rate for *model* (exact name, else the default)."""
        if model is not None and model in self.gpu_hour_milli_by_model:
            return int(self.gpu_hour_milli_by_model[model])
        return self.gpu_hour_milli

    def problems(self) -> list[str]:
        """What is wrong with this policy (empty: nothing), one sentence each."""
        out = []
        for name in ("gpu_hour_milli", "cpu_hour_milli", "memory_gb_hour_milli"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0, not {getattr(self, name)}")
        for model, rate in self.gpu_hour_milli_by_model.items():
            if not isinstance(rate, int) or rate < 0:
                out.append(f"gpu_hour_milli_by_model[{model!r}] must be an integer >= 0")
        if not 1 <= self.interval_s <= 3600:
            out.append(f"interval_s must be from 1 to 3600 seconds, not {self.interval_s}")
        if self.warn_threshold_milli < 0:
            out.append(f"warn_threshold_milli must be >= 0, not {self.warn_threshold_milli}")
        if not 0 <= self.admission_min_hours <= 24 * 365:
            out.append(
                f"admission_min_hours must be from 0 to 8760, not {self.admission_min_hours}"
            )
        return out


@dataclass(frozen=True)
class Resources:
    """What a piece of work holds: GPUs in thousandths (two whole GPUs: 2000), their model,
    CPU in thousandths, memory in MiB."""

    gpu_milli: int = 0
    gpu_model: str | None = None
    cpu_milli: int = 0
    memory_mib: int = 0


def _rate_scaled(policy: Policy, r: Resources) -> int:
    """Milli-credits per hour times :data:`_SCALE` (exact integers)."""
    return (
        r.gpu_milli * policy.gpu_rate_milli(r.gpu_model) * 1024
        + r.cpu_milli * policy.cpu_hour_milli * 1024
        + r.memory_mib * policy.memory_gb_hour_milli * 1000
    )


def cost_per_hour_milli(policy: Policy, r: Resources) -> int:
    """Milli-credits one hour of *r* costs (rounded up: what a user should budget)."""
    return -(-_rate_scaled(policy, r) // _SCALE)


def cost_milli(policy: Policy, r: Resources, seconds: float) -> int:
    """Milli-credits *seconds* of *r* cost, rounded down to whole milli-credits (microsecond
    resolution; negative seconds cost nothing)."""
    micros = max(0, round(seconds * 1_000_000))
    return _rate_scaled(policy, r) * micros // (_SCALE * 3600 * 1_000_000)


def interval_charge_milli(policy: Policy, r: Resources, start_s: float, end_s: float) -> int:
    """The charge for the part ``[start_s, end_s)`` of a piece of work, in seconds since it
    began: ``cost(end) - cost(start)``. Charges of consecutive parts add up to exactly
    ``cost_milli`` of the whole (no rounding drifts, whatever the interval)."""
    return cost_milli(policy, r, end_s) - cost_milli(policy, r, start_s)


def interval_floor(t: datetime, interval_s: int) -> datetime:
    """The start of the billing interval that holds *t* (intervals aligned on the epoch)."""
    micros = (t - EPOCH) // timedelta(microseconds=1)
    step = interval_s * 1_000_000
    return EPOCH + timedelta(microseconds=micros - micros % step)


def hours_left(balance_milli: int, per_hour_milli: int) -> float | None:
    """Hours the balance lasts at *per_hour_milli* (None: nothing burns; 0: nothing left)."""
    if per_hour_milli <= 0:
        return None
    return max(0.0, balance_milli / per_hour_milli)


def format_credits(milli: int) -> str:
    """``12.345`` for 12345 milli-credits (three decimals, a sign when negative)."""
    sign = "-" if milli < 0 else ""
    return f"{sign}{abs(milli) // MILLI}.{abs(milli) % MILLI:03d}"


# ---- accounts and the ledger ----------------------------------------------------------------


def _account_table(team: bool) -> type[User] | type[Team]:
    return Team if team else User


def ensure_user(s: Session, name: str, now: datetime, opening_milli: int = 0) -> User:
    """The user row for *name*, created (with *opening_milli* as a ledger grant) if absent."""
    user = s.scalar(select(User).where(User.name == name))
    if user is not None:
        return user
    user = User(name=name, credits_milli=0, created=now, last_seen=now, groups=[])
    try:
        with s.begin_nested():  # another request may create the same user at once
            s.add(user)
            s.flush()
    except IntegrityError:
        found = s.scalar(select(User).where(User.name == name))
        assert found is not None
        return found
    if opening_milli:
        post(
            s,
            account=name,
            amount_milli=opening_milli,
            kind="grant",
            reason="opening balance",
            actor="nsml",
            now=now,
        )
        s.refresh(user)
    return user


def post(
    s: Session,
    *,
    account: str,
    amount_milli: int,
    kind: str,
    reason: str,
    actor: str,
    now: datetime,
    team: bool = False,
    floor_milli: int | None = None,
    user_name: str | None = None,
    session_id: int | None = None,
    server_name: str | None = None,
    allocation_id: int | None = None,
    interval_start: datetime | None = None,
) -> CreditEntry:
    """Add one ledger row and move the cached balance by *amount_milli*, atomically.

    The balance moves by one conditional ``UPDATE`` (``credits_milli + :amount``); with
    *floor_milli*, only if the new balance stays at or above it (else :class:`CreditError`
    and nothing is written). The account must exist.
    """
    table = _account_table(team)
    stmt = (
        update(table)
        .where(table.name == account)
        .values(credits_milli=table.credits_milli + amount_milli)
    )
    if floor_milli is not None:
        stmt = stmt.where(table.credits_milli + amount_milli >= floor_milli)
    if s.execute(stmt.execution_options(synchronize_session=False)).rowcount != 1:  # type: ignore[attr-defined]
        exists = s.scalar(select(table.id).where(table.name == account))
        what = "team" if team else "user"
        if exists is None:
            raise CreditError(f"No {what} named {account!r}.", 404, "not_found")
        raise CreditError(
            f"The {what} {account!r} has {format_credits(balance_milli(s, account, team))} "
            f"credits; deducting {format_credits(-amount_milli)} would take the balance "
            f"below {format_credits(floor_milli or 0)}.",
            409,
            "insufficient_credits",
        )
    entry = CreditEntry(
        account_kind="team" if team else "user",
        account=account,
        amount_milli=amount_milli,
        kind=kind,
        reason=reason,
        actor=actor,
        user_name=user_name,
        session_id=session_id,
        server_name=server_name,
        allocation_id=allocation_id,
        interval_start=interval_start,
        created=now,
    )
    s.add(entry)
    s.flush()
    return entry


def grant(
    s: Session,
    account: str,
    amount_milli: int,
    reason: str,
    actor: str,
    now: datetime,
    team: bool = False,
) -> CreditEntry:
    """Give *account* credits (a negative amount deducts, never below zero), as *actor*, with
    a ledger row and an audit row. A user who never used NSML gets a row; a team must exist.
    Raises :class:`CreditError` (a deduction past the balance, an unknown team, no reason)."""
    if not reason.strip():
        raise CreditError("Give a reason for the grant (it goes into the ledger).")
    if amount_milli == 0:
        raise CreditError("The amount is zero: give a positive amount, or a negative one.")
    if not team:
        ensure_user(s, account, now)
    entry = post(
        s,
        account=account,
        amount_milli=amount_milli,
        kind="grant",
        reason=reason.strip(),
        actor=actor,
        now=now,
        team=team,
        floor_milli=0 if amount_milli < 0 else None,
    )
    _rearm_warning(s, account, team)
    audit.record(
        s,
        actor,
        "credits.grant",
        f"{'team' if team else 'user'}:{account}",
        {"amount_milli": amount_milli, "reason": entry.reason, "entry": entry.id},
        now,
    )
    log.info(
        "credits: %s %s %s by %s (%s)",
        "team" if team else "user",
        account,
        format_credits(amount_milli),
        actor,
        entry.reason,
    )
    return entry


def set_balance(
    s: Session,
    account: str,
    target_milli: int,
    reason: str,
    actor: str,
    now: datetime,
    team: bool = False,
) -> CreditEntry:
    """Set *account*'s balance to *target_milli* exactly: a grant (or deduction) of the
    difference, computed from the balance read under a lock in the caller's transaction,
    so that a charge or grant committed meanwhile is never overwritten or undone. The lock:
    ``SELECT ... FOR UPDATE`` of the account row on PostgreSQL; on SQLite, the database's
    write lock, taken by a no-op ``UPDATE`` before the read. Audited like :func:`grant`;
    the ledger row's reason says ``set to X: reason``."""
    if target_milli < 0:
        raise CreditError("A balance cannot be set below zero.")
    table = _account_table(team)
    where = table.name == account
    if s.get_bind().dialect.name == "postgresql":
        current = s.scalar(select(table.credits_milli).where(where).with_for_update())
    else:
        s.execute(
            update(table)
            .where(where)
            .values(credits_milli=table.credits_milli)
            .execution_options(synchronize_session=False)
        )
        current = s.scalar(select(table.credits_milli).where(where))
    if current is None:
        what = "team" if team else "user"
        raise CreditError(f"No {what} named {account!r}.", 404, "not_found")
    delta = target_milli - int(current)
    if delta == 0:
        raise CreditError(f"{account} already has {format_credits(target_milli)} credits.")
    text = f"set to {format_credits(target_milli)}" + (
        f": {reason.strip()}" if reason.strip() else ""
    )
    return grant(s, account, delta, text, actor, now, team=team)


def _rearm_warning(s: Session, account: str, team: bool) -> None:
    """After a grant, a later low balance warns again."""
    table = _account_table(team)
    s.execute(
        update(table)
        .where(table.name == account, table.credits_warned.is_(True))
        .values(credits_warned=False)
        .execution_options(synchronize_session=False)
    )


def balance_milli(s: Session, account: str, team: bool = False) -> int:
    """The cached balance of *account* (0 for an account that does not exist)."""
    table = _account_table(team)
    value = s.scalar(select(table.credits_milli).where(table.name == account))
    return int(value or 0)


def ledger_balance_milli(s: Session, account: str, team: bool = False) -> int:
    """The balance of *account* recomputed from the ledger alone."""
    value = s.scalar(
        select(func.coalesce(func.sum(CreditEntry.amount_milli), 0)).where(
            CreditEntry.account_kind == ("team" if team else "user"),
            CreditEntry.account == account,
        )
    )
    return int(value or 0)


def mismatched_balances(s: Session) -> list[tuple[str, str, int, int]]:
    """Every account whose cached balance differs from its ledger's sum, as
    ``(kind, name, cached, ledger)``: empty unless something wrote a balance behind the
    ledger's back."""
    sums: dict[tuple[str, str], int] = {
        (k, a): int(v)
        for k, a, v in s.execute(
            select(
                CreditEntry.account_kind, CreditEntry.account, func.sum(CreditEntry.amount_milli)
            ).group_by(CreditEntry.account_kind, CreditEntry.account)
        )
    }
    out = []
    for kind, table in (("user", User), ("team", Team)):
        for name, cached in s.execute(select(table.name, table.credits_milli)):
            ledger = sums.pop((kind, name), 0)
            if int(cached) != ledger:
                out.append((kind, name, int(cached), ledger))
    out.extend((k, a, 0, v) for (k, a), v in sums.items() if v)
    return out


def history(s: Session, account: str, limit: int = 100, team: bool = False) -> list[CreditEntry]:
    """The newest *limit* ledger rows of *account*, newest first."""
    return list(
        s.scalars(
            select(CreditEntry)
            .where(
                CreditEntry.account_kind == ("team" if team else "user"),
                CreditEntry.account == account,
            )
            .order_by(CreditEntry.id.desc())
            .limit(max(0, limit))
        )
    )


def usage_by_day(
    s: Session, account: str, days: int, now: datetime, team: bool = False
) -> list[tuple[date, int]]:
    """Milli-credits charged to *account* on each of the last *days* days (UTC), oldest
    first, today included, days without charges as 0 (refunds lower a day's figure)."""
    days = max(1, days)
    first = (now - timedelta(days=days - 1)).date()
    start = datetime(first.year, first.month, first.day)
    per_day = {first + timedelta(days=i): 0 for i in range(days)}
    rows = s.execute(
        select(CreditEntry.created, CreditEntry.amount_milli).where(
            CreditEntry.account_kind == ("team" if team else "user"),
            CreditEntry.account == account,
            CreditEntry.kind.in_(("charge", "refund")),
            CreditEntry.created >= start,
        )
    )
    for created, amount in rows:
        d = created.date()
        if d in per_day:
            per_day[d] -= int(amount)
    return sorted(per_day.items())


# ---- who pays, and what runs now ------------------------------------------------------------


class PayerFields(Protocol):
    """What :func:`payer` reads of a user (a :class:`User`, or a row of these columns)."""

    name: str
    billing_team: str | None
    groups: list[Any]


def payer(user: PayerFields | None, teams_that_pay: Mapping[str, bool]) -> tuple[bool, str] | None:
    """``(team?, account)`` that pays for *user*'s work: their ``billing_team`` when that team
    pays and the user is still in its hub group, else the user. None for no user row."""
    if user is None:
        return None
    team = user.billing_team
    if team and teams_that_pay.get(team) and team in (user.groups or []):
        return True, team
    return False, user.name


def teams_that_pay(s: Session) -> dict[str, bool]:
    """``{team name: pays}`` for every team."""
    return {name: bool(pays) for name, pays in s.execute(select(Team.name, Team.pays))}


def allocation_resources(a: Allocation, gpu_models: Mapping[tuple[int, int], str]) -> Resources:
    """What allocation *a* holds, with its GPUs' model from *gpu_models* ``{(node id, gpu
    index): model}``."""
    indices = list(a.gpu_indices or [])
    model = gpu_models.get((a.node_id, int(indices[0]))) if indices else None
    return Resources(
        gpu_milli=len(indices) * int(a.gpu_milli_per_gpu or 0),
        gpu_model=model,
        cpu_milli=int(a.cpu_milli or 0),
        memory_mib=int(a.memory_mib or 0),
    )


def gpu_models(s: Session) -> dict[tuple[int, int], str]:
    """``{(node id, gpu index): model}`` of every GPU."""
    return {(n, i): m for n, i, m in s.execute(select(Gpu.node_id, Gpu.index, Gpu.model))}


def burn_rate_milli_per_hour(
    s: Session, account: str, now: datetime, team: bool = False, policy: Policy | None = None
) -> int:
    """Milli-credits per hour that what runs now for *account* costs under the policy: the
    active allocations (sessions, evaluations, notebook servers) its users hold. *now* is
    the time of the answer (allocations released before it do not count)."""
    policy = policy or get_policy(s)
    pays = teams_that_pay(s)
    if team:
        members = [
            u
            for u in s.scalars(select(User).where(User.billing_team == account))
            if payer(u, pays) == (True, account)
        ]
        names = [u.name for u in members]
    else:
        u = s.scalar(select(User).where(User.name == account))
        names = [account] if u is None or payer(u, pays) == (False, account) else []
    if not names:
        return 0
    models = gpu_models(s)
    allocs = s.scalars(
        select(Allocation).where(
            Allocation.state == "active",
            Allocation.user_name.in_(names),
            Allocation.created <= now,
        )
    )
    return sum(cost_per_hour_milli(policy, allocation_resources(a, models)) for a in allocs)


# ---- the policy -----------------------------------------------------------------------------


def get_policy(s: Session) -> Policy:
    """The policy in force (the defaults until an admin sets one)."""
    row = s.get(CreditPolicyRow, 1)
    if row is None:
        return Policy()
    return Policy(
        gpu_hour_milli=int(row.gpu_hour_milli),
        gpu_hour_milli_by_model={k: int(v) for k, v in (row.gpu_hour_milli_by_model or {}).items()},
        cpu_hour_milli=int(row.cpu_hour_milli),
        memory_gb_hour_milli=int(row.memory_gb_hour_milli),
        interval_s=int(row.interval_s),
        warn_threshold_milli=int(row.warn_threshold_milli),
        admission_min_hours=float(row.admission_min_hours),
    )


def set_policy(s: Session, policy: Policy, actor: str, now: datetime) -> Policy:
    """Put *policy* in force (from the next billing pass), with an audit row of the change.
    Raises :class:`CreditError` naming every problem of an invalid policy."""
    problems = policy.problems()
    if problems:
        raise CreditError("Invalid credit policy: " + "; ".join(problems) + ".")
    before = get_policy(s)
    row = s.get(CreditPolicyRow, 1)
    if row is None:
        row = CreditPolicyRow(id=1, updated=now, updated_by=actor)
        s.add(row)
    row.gpu_hour_milli = policy.gpu_hour_milli
    row.gpu_hour_milli_by_model = dict(policy.gpu_hour_milli_by_model)
    row.cpu_hour_milli = policy.cpu_hour_milli
    row.memory_gb_hour_milli = policy.memory_gb_hour_milli
    row.interval_s = policy.interval_s
    row.warn_threshold_milli = policy.warn_threshold_milli
    row.admission_min_hours = policy.admission_min_hours
    row.updated = now
    row.updated_by = actor
    s.flush()
    audit.record(
        s,
        actor,
        "credits.policy",
        "policy",
        {"before": policy_dict(before), "after": policy_dict(policy)},
        now,
    )
    return policy


def policy_dict(policy: Policy) -> dict[str, Any]:
    """The policy as plain JSON values."""
    return {
        "gpu_hour_milli": policy.gpu_hour_milli,
        "gpu_hour_milli_by_model": dict(policy.gpu_hour_milli_by_model),
        "cpu_hour_milli": policy.cpu_hour_milli,
        "memory_gb_hour_milli": policy.memory_gb_hour_milli,
        "interval_s": policy.interval_s,
        "warn_threshold_milli": policy.warn_threshold_milli,
        "admission_min_hours": policy.admission_min_hours,
    }


def policy_from_dict(data: Mapping[str, Any], base: Policy | None = None) -> Policy:
    """*base* (default: the defaults) with the fields *data* gives."""
    known = policy_dict(Policy())
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CreditError(
            f"Unknown policy field(s) {', '.join(unknown)}; valid: {', '.join(known)}."
        )
    return replace(base or Policy(), **dict(data))


# ---- what sessions and users cost -----------------------------------------------------------


@dataclass(frozen=True)
class SessionCredits:
    """A session's credit figures: milli-credits charged so far (every attempt), and its
    cost per hour at the current policy while it holds an allocation (None: it holds none)."""

    used_milli: int
    rate_milli: int | None


def session_credits(
    s: Session,
    sessions: Sequence[tuple[int, int | None]],
    policy: Policy | None = None,
) -> dict[int, SessionCredits]:
    """:class:`SessionCredits` of each ``(session id, placement id)`` in *sessions*, in a
    fixed number of queries however many (a list answers them without a query per row)."""
    ids = [sid for sid, _ in sessions]
    if not ids:
        return {}
    used: dict[int, int] = {}
    for i in range(0, len(ids), 5000):
        chunk = ids[i : i + 5000]
        for sid, total in s.execute(
            select(CreditEntry.session_id, func.sum(CreditEntry.amount_milli))
            .where(CreditEntry.session_id.in_(chunk), CreditEntry.kind != "grant")
            .group_by(CreditEntry.session_id)
        ):
            if sid is not None:
                used[int(sid)] = -int(total or 0)
    pids = [pid for _, pid in sessions if pid is not None]
    held: dict[int, Allocation] = {}
    if pids:
        policy = policy or get_policy(s)
        for i in range(0, len(pids), 5000):
            pchunk = pids[i : i + 5000]
            for placement_id, alloc in s.execute(
                select(PlacementRequestRow.id, Allocation)
                .join(Allocation, Allocation.id == PlacementRequestRow.allocation_id)
                .where(PlacementRequestRow.id.in_(pchunk), Allocation.state == "active")
            ):
                held[int(placement_id)] = alloc
    models = gpu_models(s) if held else {}
    out: dict[int, SessionCredits] = {}
    for sid, pid in sessions:
        a = held.get(pid) if pid is not None else None
        rate: int | None = (
            cost_per_hour_milli(policy, allocation_resources(a, models))
            if a is not None and policy is not None
            else None
        )
        out[sid] = SessionCredits(used.get(sid, 0), rate)
    return out


def user_burn_rate_milli_per_hour(
    s: Session, user: str, now: datetime, policy: Policy | None = None
) -> int:
    """Milli-credits per hour that everything *user* runs now costs under the policy (their
    active allocations: sessions, evaluations, notebook servers), whoever pays for it."""
    policy = policy or get_policy(s)
    allocs = list(
        s.scalars(
            select(Allocation).where(
                Allocation.state == "active",
                Allocation.user_name == user,
                Allocation.created <= now,
            )
        )
    )
    if not allocs:
        return 0
    models = gpu_models(s)
    return sum(cost_per_hour_milli(policy, allocation_resources(a, models)) for a in allocs)


def paying_team(s: Session, user: str, groups: Sequence[str]) -> str | None:
    """The team whose pool pays for *user*'s work now (their billing team, when it pays and
    *groups*, the user's hub groups, still hold it), or None when the user pays."""
    team = s.scalar(select(User.billing_team).where(User.name == user))
    if not team or team not in groups:
        return None
    pays = s.scalar(select(Team.pays).where(Team.name == team))
    return team if pays else None
