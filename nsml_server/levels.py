"""Permission levels and their limits, teams, and admission of new work.

Levels are ``user``, ``team_admin`` and ``admin`` (a hub admin is always ``admin``). Each
level has limits: the most GPUs a user holds at once, the most sessions a user has active
(queued, preparing or running), and the queue priority of their sessions; an admin may
override each limit per user. Teams are JupyterHub groups (the hub owns membership; the
server mirrors a user's groups at each contact); a team may keep a credit pool that its
members draw from when their ``billing_team`` is that team.

:func:`admit` is what every way of starting work calls (a session, a resume, a fork, an
evaluation, a notebook server with GPUs): it refuses with :class:`CreditError` when a limit
would be passed or the balance does not cover the policy's ``admission_min_hours`` of the
work, with a message that gives the balance, the cost per hour and how long it would run.
The pure parts are :func:`effective_limits` and :func:`credit_refusal`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import audit, credits
from .credits import CreditError, Policy, Resources, format_credits
from .models import (
    PERMISSION_LEVELS,
    SESSION_ACTIVE_STATES,
    Allocation,
    LevelLimit,
    Team,
    TeamAdmin,
    TrainingSession,
    User,
)

GPU_MILLI = 1000


@dataclass(frozen=True)
class Limits:
    """Caps of one user (None: no cap) and the queue priority of their work."""

    max_gpus: float | None = None
    max_running: int | None = None
    priority: int = 0


DEFAULT_LEVEL_LIMITS: Mapping[str, Limits] = {
    "user": Limits(priority=0),
    "team_admin": Limits(priority=5),
    "admin": Limits(priority=10),
}
"""Limits of each level until an admin sets them (no caps; admins' work first)."""


def effective_limits(level: Limits, user: User | None) -> Limits:
    """*level*'s limits with *user*'s overrides (each non-None override wins)."""
    if user is None:
        return level
    return Limits(
        max_gpus=user.max_gpus if user.max_gpus is not None else level.max_gpus,
        max_running=user.max_running if user.max_running is not None else level.max_running,
        priority=user.priority if user.priority is not None else level.priority,
    )


def credit_refusal(
    balance_milli: int, per_hour_milli: int, min_hours: float, what: str
) -> str | None:
    """Why *what* may not start with this balance (None: it may). It may when it costs
    nothing, or when the balance covers *min_hours* of it."""
    if per_hour_milli <= 0:
        return None
    need = round(per_hour_milli * min_hours)
    if balance_milli >= need and balance_milli > 0:
        return None
    left = credits.hours_left(balance_milli, per_hour_milli) or 0.0
    return (
        f"Not enough credits to start {what}: the balance is {format_credits(balance_milli)} "
        f"credits and it costs {format_credits(per_hour_milli)} credits an hour, so it would "
        f"run about {_duration(left)}; starting needs {_duration(min_hours)} of it "
        f"({format_credits(need)} credits). Ask an admin for credits, or ask for fewer GPUs."
    )


def _duration(hours: float) -> str:
    minutes = round(hours * 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{hours:.1f} h"


def level_of(user: User | None, hub_admin: bool) -> str:
    """The permission level in force: a hub admin is ``admin``; else the stored one."""
    if hub_admin:
        return "admin"
    return user.level if user is not None and user.level in PERMISSION_LEVELS else "user"


def level_limits(s: Session) -> dict[str, Limits]:
    """The limits of every level (stored rows over :data:`DEFAULT_LEVEL_LIMITS`)."""
    out = dict(DEFAULT_LEVEL_LIMITS)
    for row in s.scalars(select(LevelLimit)):
        out[row.level] = Limits(row.max_gpus, row.max_running, row.priority)
    return out


def limits_for(s: Session, name: str, hub_admin: bool = False) -> Limits:
    """The limits in force for user *name*."""
    user = s.scalar(select(User).where(User.name == name))
    return effective_limits(level_limits(s)[level_of(user, hub_admin)], user)


def queue_priority(s: Session, name: str) -> int:
    """The queue priority of user *name*'s sessions (their level's, or their override)."""
    user = s.scalar(select(User).where(User.name == name))
    hub_admin = user is not None and user.permission == "admin"
    return effective_limits(level_limits(s)[level_of(user, hub_admin)], user).priority


def set_level_limits(s: Session, level: str, limits: Limits, actor: str, now: datetime) -> None:
    """Set the limits of *level* (audited)."""
    _check_level(level)
    _check_limits(limits)
    row = s.get(LevelLimit, level)
    if row is None:
        row = LevelLimit(level=level)
        s.add(row)
    row.max_gpus = None if limits.max_gpus is None else int(limits.max_gpus)
    row.max_running = limits.max_running
    row.priority = limits.priority
    audit.record(s, actor, "levels.limits", f"level:{level}", _limits_dict(limits), now)


def set_user_level(
    s: Session,
    name: str,
    actor: str,
    now: datetime,
    *,
    level: str | None = None,
    overrides: Mapping[str, int | None] | None = None,
) -> User:
    """Set user *name*'s level and/or limit overrides (keys ``max_gpus``, ``max_running``,
    ``priority``; None clears one); audited. A user never seen gets a row."""
    user = credits.ensure_user(s, name, now)
    detail: dict[str, Any] = {}
    if level is not None:
        _check_level(level)
        detail["level"] = [user.level, level]
        user.level = level
    for key, value in (overrides or {}).items():
        if key not in ("max_gpus", "max_running", "priority"):
            raise CreditError(f"Unknown limit {key!r}; valid: max_gpus, max_running, priority.")
        if value is not None and key != "priority" and value < 0:
            raise CreditError(f"{key} must be >= 0 or null (no cap), not {value}.")
        detail[key] = [getattr(user, key), value]
        setattr(user, key, value)
    if detail:
        audit.record(s, actor, "levels.user", f"user:{name}", detail, now)
    return user


def _check_level(level: str) -> None:
    if level not in PERMISSION_LEVELS:
        raise CreditError(f"Unknown level {level!r}; valid: {', '.join(PERMISSION_LEVELS)}.")


def _check_limits(limits: Limits) -> None:
    for key in ("max_gpus", "max_running"):
        value = getattr(limits, key)
        if value is not None and value < 0:
            raise CreditError(f"{key} must be >= 0 or null (no cap), not {value}.")


def _limits_dict(limits: Limits) -> dict[str, Any]:
    return {
        "max_gpus": limits.max_gpus,
        "max_running": limits.max_running,
        "priority": limits.priority,
    }


# ---- teams ----------------------------------------------------------------------------------


def get_team(s: Session, name: str) -> Team | None:
    return s.scalar(select(Team).where(Team.name == name))


def set_team(s: Session, name: str, actor: str, now: datetime, *, pays: bool | None = None) -> Team:
    """Create team *name* (a hub group's name) or change whether its pool pays; audited."""
    team = get_team(s, name)
    if team is None:
        team = Team(name=name, pays=bool(pays), credits_milli=0, created=now)
        s.add(team)
        s.flush()
        audit.record(s, actor, "teams.create", f"team:{name}", {"pays": team.pays}, now)
    elif pays is not None and pays != team.pays:
        team.pays = pays
        audit.record(s, actor, "teams.pays", f"team:{name}", {"pays": pays}, now)
    return team


def team_admins(s: Session, name: str) -> list[str]:
    team = get_team(s, name)
    if team is None:
        return []
    return sorted(s.scalars(select(TeamAdmin.user_name).where(TeamAdmin.team_id == team.id)))


def set_team_admin(
    s: Session, name: str, user: str, is_admin: bool, actor: str, now: datetime
) -> None:
    """Make *user* an admin of team *name* or not (audited); the team must exist."""
    team = get_team(s, name)
    if team is None:
        raise CreditError(f"No team named {name!r}.", 404, "not_found")
    row = s.get(TeamAdmin, (team.id, user))
    if is_admin and row is None:
        s.add(TeamAdmin(team_id=team.id, user_name=user))
    elif not is_admin and row is not None:
        s.delete(row)
    else:
        return
    audit.record(s, actor, "teams.admin", f"team:{name}", {"user": user, "admin": is_admin}, now)


def is_team_admin(s: Session, team: str, user: str) -> bool:
    return user in team_admins(s, team)


def teams_administered(s: Session, user: str) -> list[str]:
    """The teams whose admin *user* is (they may stop those teams' sessions)."""
    q = select(Team.name).join(TeamAdmin, TeamAdmin.team_id == Team.id)
    return sorted(s.scalars(q.where(TeamAdmin.user_name == user)))


def set_billing_team(s: Session, user: str, team: str | None, actor: str, now: datetime) -> User:
    """Let *team*'s pool pay for *user*'s work (None: the user pays); audited. The user must
    be in the team's hub group (as last seen) and the team must exist."""
    row = credits.ensure_user(s, user, now)
    if team is not None:
        t = get_team(s, team)
        if t is None:
            raise CreditError(f"No team named {team!r}.", 404, "not_found")
        if team not in (row.groups or []):
            raise CreditError(
                f"{user} is not in the hub group {team!r} (as last seen); add them to the "
                "group in the hub first.",
                409,
                "conflict",
            )
    audit.record(
        s, actor, "teams.billing", f"user:{user}", {"from": row.billing_team, "to": team}, now
    )
    row.billing_team = team
    return row


# ---- admission ------------------------------------------------------------------------------


def resources_of_spec(spec: Mapping[str, Any]) -> Resources:
    """The resources of a placement spec or a session's stored resources."""
    models = list(spec.get("gpu_models") or [])
    return Resources(
        gpu_milli=int(spec.get("gpu_milli", 0) or 0),
        gpu_model=models[0] if len(models) == 1 else None,
        cpu_milli=int(spec.get("cpu_milli", 0) or 0),
        memory_mib=int(spec.get("memory_mib", 0) or 0),
    )


def admit(
    s: Session,
    user: str,
    spec: Mapping[str, Any],
    what: str,
    now: datetime,
    *,
    hub_admin: bool = False,
    counts_as_session: bool = True,
    policy: Policy | None = None,
) -> int:
    """Refuse new work *what* of *user* asking *spec* (:class:`CreditError`, 402 for
    credits, 403 for a limit), or return its queue priority."""
    row = s.scalar(select(User).where(User.name == user))
    limits = effective_limits(level_limits(s)[level_of(row, hub_admin)], row)
    asked = resources_of_spec(spec)
    if limits.max_gpus is not None and asked.gpu_milli:
        held = _held_gpu_milli(s, user)
        if int(held or 0) + asked.gpu_milli > limits.max_gpus * GPU_MILLI:
            raise CreditError(
                f"Your level allows {limits.max_gpus:g} GPUs at once; you hold "
                f"{int(held or 0) / GPU_MILLI:g} and {what} asks for "
                f"{asked.gpu_milli / GPU_MILLI:g}. Stop something first, or ask an admin.",
                403,
                "limit",
            )
    if counts_as_session and limits.max_running is not None:
        active = s.scalar(
            select(func.count()).where(
                TrainingSession.user_name == user,
                TrainingSession.state.in_(SESSION_ACTIVE_STATES),
            )
        )
        if int(active or 0) >= limits.max_running:
            raise CreditError(
                f"Your level allows {limits.max_running} active sessions; you have "
                f"{active}. Stop one first (nsml ps, nsml stop), or ask an admin.",
                403,
                "limit",
            )
    policy = policy or credits.get_policy(s)
    per_hour = credits.cost_per_hour_milli(policy, asked)
    account = credits.payer(row, credits.teams_that_pay(s)) or (False, user)
    balance = credits.balance_milli(s, account[1], team=account[0])
    why = credit_refusal(balance, per_hour, policy.admission_min_hours, what)
    if why is not None:
        if account[0]:
            why = why.replace("the balance is", f"team {account[1]}'s pool has", 1)
        raise CreditError(why, 402, "insufficient_credits")
    return limits.priority


def _held_gpu_milli(s: Session, user: str) -> int:
    total = 0
    for indices, milli in s.execute(
        select(Allocation.gpu_indices, Allocation.gpu_milli_per_gpu).where(
            Allocation.user_name == user, Allocation.state == "active"
        )
    ):
        total += len(indices or []) * int(milli or 0)
    return total
