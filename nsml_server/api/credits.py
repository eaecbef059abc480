"""REST handlers: credits (balances, grants, history), the credit policy, permission levels
and teams. Admins only, except that a user reads their own credits and the policy, and a
team admin manages who their team's pool pays for and who is in their team."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import credits, levels, teams
from ..credits import CreditError, format_credits
from ..models import CreditEntry, Team, User
from ..schemas import (
    BillingTeamIn,
    CreditEntryOut,
    CreditGrantIn,
    CreditPolicyIn,
    CreditPolicyOut,
    CreditsOut,
    DayUsage,
    LevelLimitsIn,
    LevelsOut,
    LimitsOut,
    TeamAdminIn,
    TeamIn,
    TeamList,
    TeamOut,
    UserLevelIn,
    UserLevelOut,
)
from .base import APIError, APIHandler, ServerContext
from .routes import Route

HISTORY_MAX = 1000
USAGE_DAYS_MAX = 366


def refusal(e: CreditError) -> APIError:
    """A domain refusal as the API's error."""
    return APIError(e.status, e.message, e.reason)


def admission(
    s: Session,
    user: str,
    spec: Mapping[str, Any],
    what: str,
    now: datetime,
    *,
    hub_admin: bool = False,
    counts_as_session: bool = True,
    opening_milli: int = 0,
) -> int:
    """:func:`nsml_server.levels.admit` for handlers: a refusal becomes a JSON 402/403. A
    user never seen gets their row (and *opening_milli*, the server's default credits)."""
    credits.ensure_user(s, user, now, opening_milli)
    try:
        return levels.admit(
            s, user, spec, what, now, hub_admin=hub_admin, counts_as_session=counts_as_session
        )
    except CreditError as e:
        raise refusal(e) from None


def entry_out(e: CreditEntry) -> CreditEntryOut:
    return CreditEntryOut(
        id=e.id,
        kind=e.kind,  # type: ignore[arg-type]
        amount=e.amount_milli / 1000,
        amount_milli=e.amount_milli,
        reason=e.reason,
        actor=e.actor,
        user=e.user_name,
        session_id=e.session_id,
        server=e.server_name,
        allocation=e.allocation_id,
        interval_start=e.interval_start.isoformat() + "Z" if e.interval_start else None,
        created=e.created.isoformat() + "Z",
    )


def credits_out(
    s: Session, account: str, now: datetime, *, team: bool, limit: int, days: int
) -> CreditsOut:
    """An account's balance, burn rate, time left, history and usage per day."""
    pays = "user"
    if not team:
        user = s.scalar(select(User).where(User.name == account))
        payer = credits.payer(user, credits.teams_that_pay(s))
        if payer is not None and payer[0]:
            pays = f"team:{payer[1]}"
    balance = credits.balance_milli(s, account, team=team)
    if pays.startswith("team:"):
        rate = credits.burn_rate_milli_per_hour(s, pays[5:], now, team=True)
        left = credits.hours_left(credits.balance_milli(s, pays[5:], team=True), rate)
    else:
        rate = credits.burn_rate_milli_per_hour(s, account, now, team=team)
        left = credits.hours_left(balance, rate)
    return CreditsOut(
        account=account,
        team=team,
        pays=pays,
        balance=balance / 1000,
        balance_milli=balance,
        burn_rate_per_hour=rate / 1000,
        hours_left=None if left is None else round(left, 4),
        history=[entry_out(e) for e in credits.history(s, account, limit, team=team)],
        usage_by_day=[
            DayUsage(day=d.isoformat(), credits=m / 1000)
            for d, m in credits.usage_by_day(s, account, days, now, team=team)
        ],
    )


class _Handler(APIHandler):
    def _int_arg(self, name: str, default: int, most: int) -> int:
        raw = self.get_query_argument(name, None)
        return default if raw is None else min(int(raw), most)

    def _grant(self, account: str, team: bool) -> CreditEntryOut:
        self.require_admin()
        body = self.body_as(CreditGrantIn)
        with self.ctx.db.session() as s:
            try:
                if team and levels.get_team(s, account) is None:
                    raise CreditError(f"No team named {account!r}.", 404, "not_found")
                entry = credits.grant(
                    s,
                    account,
                    round(body.amount * 1000),
                    body.reason,
                    self.user_name,
                    self.ctx.now(),
                    team=team,
                )
            except CreditError as e:
                raise refusal(e) from None
            return entry_out(entry)


class UserCreditsHandler(_Handler):
    """``GET users/NAME/credits`` (the user or an admin); ``POST`` (admin) a grant."""

    def get(self, name: str) -> None:
        if name != self.user_name:
            self.require_admin()
        limit = self._int_arg("limit", 100, HISTORY_MAX)
        days = self._int_arg("days", 14, USAGE_DAYS_MAX)
        with self.ctx.db.session() as s:
            out = credits_out(s, name, self.ctx.now(), team=False, limit=limit, days=days)
        self.write_json(out)

    def post(self, name: str) -> None:
        self.write_json(self._grant(name, team=False), 201)


class TeamCreditsHandler(_Handler):
    """``GET teams/NAME/credits`` (an admin, the team's admins and members); ``POST`` (admin)."""

    def get(self, name: str) -> None:
        assert self.hub_user is not None
        limit = self._int_arg("limit", 100, HISTORY_MAX)
        days = self._int_arg("days", 14, USAGE_DAYS_MAX)
        with self.ctx.db.session() as s:
            if levels.get_team(s, name) is None:
                raise APIError(404, f"No team named {name!r}.", "not_found")
            member = name in (self.hub_user.get("groups") or [])
            if not (self.is_admin or member or levels.is_team_admin(s, name, self.user_name)):
                raise APIError(
                    403, f"Only team {name}'s members and admins see its pool.", "forbidden"
                )
            out = credits_out(s, name, self.ctx.now(), team=True, limit=limit, days=days)
        self.write_json(out)

    def post(self, name: str) -> None:
        self.write_json(self._grant(name, team=True), 201)


def policy_out(p: credits.Policy) -> CreditPolicyOut:
    return CreditPolicyOut.model_validate(credits.policy_dict(p))


class PolicyHandler(_Handler):
    """``GET credits/policy`` (any user); ``PUT`` (admin) change some of its fields."""

    def get(self) -> None:
        with self.ctx.db.session() as s:
            out = policy_out(credits.get_policy(s))
        self.write_json(out)

    def put(self) -> None:
        self.require_admin()
        body = self.body_as(CreditPolicyIn)
        changes = body.model_dump(exclude_none=True)
        with self.ctx.db.session() as s:
            try:
                new = credits.policy_from_dict(changes, credits.get_policy(s))
                credits.set_policy(s, new, self.user_name, self.ctx.now())
            except CreditError as e:
                raise refusal(e) from None
        self.write_json(policy_out(new))


def limits_out(limits: levels.Limits) -> LimitsOut:
    return LimitsOut(
        max_gpus=limits.max_gpus, max_running=limits.max_running, priority=limits.priority
    )


class LevelsHandler(_Handler):
    """``GET levels`` (admin): the limits of every permission level."""

    def get(self) -> None:
        self.require_admin()
        with self.ctx.db.session() as s:
            out = LevelsOut(levels={k: limits_out(v) for k, v in levels.level_limits(s).items()})
        self.write_json(out)


class LevelHandler(_Handler):
    """``PUT levels/LEVEL`` (admin): set a level's limits."""

    def put(self, level: str) -> None:
        self.require_admin()
        body = self.body_as(LevelLimitsIn)
        limits = levels.Limits(body.max_gpus, body.max_running, body.priority)
        with self.ctx.db.session() as s:
            try:
                levels.set_level_limits(s, level, limits, self.user_name, self.ctx.now())
            except CreditError as e:
                raise refusal(e) from None
        self.write_json(limits_out(limits))


def user_level_out(s: Session, user: User) -> UserLevelOut:
    limits = levels.effective_limits(
        levels.level_limits(s)[levels.level_of(user, user.permission == "admin")], user
    )
    return UserLevelOut(
        name=user.name,
        level=levels.level_of(user, user.permission == "admin"),
        overrides={
            "max_gpus": user.max_gpus,
            "max_running": user.max_running,
            "priority": user.priority,
        },
        limits=limits_out(limits),
        billing_team=user.billing_team,
        groups=list(user.groups or []),
    )


class UserLevelHandler(_Handler):
    """``GET users/NAME/level`` (the user or an admin); ``PUT`` (admin) level and overrides."""

    def get(self, name: str) -> None:
        if name != self.user_name:
            self.require_admin()
        with self.ctx.db.session() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is None:  # never seen: the defaults (a GET writes nothing)
                user = User(name=name, level="user", permission="user", groups=[])
            out = user_level_out(s, user)
        self.write_json(out)

    def put(self, name: str) -> None:
        self.require_admin()
        body = self.body_as(UserLevelIn)
        given = body.model_dump(exclude_unset=True)
        level = given.pop("level", None)
        with self.ctx.db.session() as s:
            try:
                user = levels.set_user_level(
                    s, name, self.user_name, self.ctx.now(), level=level, overrides=given
                )
            except CreditError as e:
                raise refusal(e) from None
            out = user_level_out(s, user)
        self.write_json(out)


class UserTeamHandler(_Handler):
    """``PUT users/NAME/team`` ``{"team": T | null}``: whose pool pays for the user's work
    (an admin, or an admin of the team given and of the team left)."""

    def put(self, name: str) -> None:
        body = self.body_as(BillingTeamIn)
        with self.ctx.db.session() as s:
            if not self.is_admin:
                current = s.scalar(select(User.billing_team).where(User.name == name))
                for team in {body.team, current} - {None}:
                    assert team is not None
                    if not levels.is_team_admin(s, team, self.user_name):
                        raise APIError(
                            403, f"This needs a hub admin or an admin of team {team}.", "forbidden"
                        )
            try:
                user = levels.set_billing_team(s, name, body.team, self.user_name, self.ctx.now())
            except CreditError as e:
                raise refusal(e) from None
            out = user_level_out(s, user)
        self.write_json(out)


def team_out(s: Session, team: Team, members: list[str] | None = None) -> TeamOut:
    """The team; its *members* as the hub just answered them, else as last seen."""
    users = list(s.scalars(select(User).order_by(User.name)))
    return TeamOut(
        name=team.name,
        pays=team.pays,
        balance=team.credits_milli / 1000,
        balance_milli=team.credits_milli,
        admins=levels.team_admins(s, team.name),
        members=members
        if members is not None
        else [u.name for u in users if team.name in (u.groups or [])],
        billed=[u.name for u in users if u.billing_team == team.name],
    )


class TeamsHandler(_Handler):
    """``GET teams`` (admin): every team."""

    def get(self) -> None:
        self.require_admin()
        with self.ctx.db.session() as s:
            teams = list(s.scalars(select(Team).order_by(Team.name)))
            out = TeamList(teams=[team_out(s, t) for t in teams])
        self.write_json(out)


class TeamHandler(_Handler):
    """``GET teams/NAME`` (admin or its team admins); ``PUT`` (admin) create it or set
    whether its pool pays."""

    def get(self, name: str) -> None:
        with self.ctx.db.session() as s:
            team = levels.get_team(s, name)
            if team is None:
                raise APIError(404, f"No team named {name!r}.", "not_found")
            if not (self.is_admin or levels.is_team_admin(s, name, self.user_name)):
                raise APIError(403, "This needs a hub admin or a team admin.", "forbidden")
            out = team_out(s, team)
        self.write_json(out)

    def put(self, name: str) -> None:
        self.require_admin()
        body = self.body_as(TeamIn)
        with self.ctx.db.session() as s:
            team = levels.set_team(s, name, self.user_name, self.ctx.now(), pays=body.pays)
            out = team_out(s, team)
        self.write_json(out)


class TeamAdminHandler(_Handler):
    """``PUT teams/NAME/admins/USER`` (admin) ``{"admin": true|false}``."""

    def put(self, name: str, user: str) -> None:
        self.require_admin()
        body = self.body_as(TeamAdminIn)
        with self.ctx.db.session() as s:
            try:
                levels.set_team_admin(s, name, user, body.admin, self.user_name, self.ctx.now())
            except CreditError as e:
                raise refusal(e) from None
            team = levels.get_team(s, name)
            assert team is not None
            out = team_out(s, team)
        self.write_json(out)


class TeamMemberHandler(_Handler):
    """``PUT``/``DELETE teams/NAME/members/USER`` (an admin or a team admin of NAME): add
    USER to the team's hub group, or remove them; the hub keeps membership."""

    async def put(self, name: str, user: str) -> None:
        await self._change(name, user, add=True)

    async def delete(self, name: str, user: str) -> None:
        await self._change(name, user, add=False)

    async def _change(self, name: str, user: str, add: bool) -> None:
        try:
            with self.ctx.db.session() as s:
                teams.may_manage(s, name, self.user_name, self.is_admin)
            hub = self.ctx.hub_auth
            members = await teams.change_hub_group(hub.api_url, hub.api_token, name, user, add)
            with self.ctx.db.session() as s:
                teams.record_member_change(s, name, user, add, self.user_name, self.ctx.now())
                team = levels.get_team(s, name)
                if team is None:
                    raise APIError(404, f"No team named {name!r}.", "not_found")
                out = team_out(s, team, members)
        except teams.TeamError as e:
            raise APIError(e.status, e.message, e.reason) from None
        self.write_json(out)


def credit_routes(ctx: ServerContext | None) -> list[Route]:
    """The routes of this module (paths as the OpenAPI document writes them)."""
    k = {"ctx": ctx}
    return [
        Route("/users/{name}/credits", UserCreditsHandler, k),
        Route("/users/{name}/level", UserLevelHandler, k),
        Route("/users/{name}/team", UserTeamHandler, k),
        Route("/credits/policy", PolicyHandler, k),
        Route("/levels", LevelsHandler, k),
        Route("/levels/{level}", LevelHandler, k),
        Route("/teams", TeamsHandler, k),
        Route("/teams/{name}", TeamHandler, k),
        Route("/teams/{name}/credits", TeamCreditsHandler, k),
        Route("/teams/{name}/admins/{user}", TeamAdminHandler, k),
        Route("/teams/{name}/members/{user}", TeamMemberHandler, k),
    ]


__all__ = ["admission", "credit_routes", "format_credits"]
