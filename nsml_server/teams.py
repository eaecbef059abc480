"""Team membership: the hub's groups stay the source of who is in a team.

An admin or a team admin of a team adds or removes a member through the NSML API (or the
admin panel); the service asks the hub's REST API (``POST``/``DELETE groups/NAME/users``,
its role's ``groups`` scope) with its own token, then mirrors the change on the member's
row (``users.groups``, read by billing and the panel until the user's next contact) and
records an audit row. The hub's answer (the group's members) is what the caller is told.

:func:`change_hub_group` is the I/O edge (async, bounded by a timeout); :func:`may_manage`
and :func:`record_member_change` are the domain, in the caller's transaction.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.orm import Session
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from . import audit, levels
from .models import User

log = logging.getLogger("nsml_server.teams")

#: Seconds the hub has to answer one membership change.
HUB_TIMEOUT_S = 30.0


class TeamError(Exception):
    """A refusal: HTTP status, a message for a person, a machine-readable reason."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def may_manage(s: Session, team: str, user: str, hub_admin: bool) -> None:
    """Raise unless *user* may change *team*'s members: a hub admin or one of its team
    admins (404 for no such team; 403 for anyone else)."""
    if levels.get_team(s, team) is None:
        raise TeamError(
            404,
            f"No team named {team!r}; an admin makes the hub group a team first "
            f"(PUT teams/{team}).",
            "not_found",
        )
    if not (hub_admin or levels.is_team_admin(s, team, user)):
        raise TeamError(
            403,
            f"Only an admin or a team admin of team {team} may change its members.",
            "forbidden",
        )


async def change_hub_group(
    api_url: str, token: str, team: str, user: str, add: bool, timeout_s: float = HUB_TIMEOUT_S
) -> list[str]:
    """Add *user* to the hub group *team* (or remove them) through the hub's REST API; the
    group's members as the hub answers them. A refusal or an unreachable hub raises
    :class:`TeamError` with the hub's reason."""
    url = f"{api_url.rstrip('/')}/groups/{quote(team, safe='')}/users"
    req = HTTPRequest(
        url,
        method="POST" if add else "DELETE",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        body=json.dumps({"users": [user]}),
        request_timeout=timeout_s,
        allow_nonstandard_methods=True,  # DELETE with a body, as the hub's API takes it
    )
    try:
        resp = await AsyncHTTPClient().fetch(req, raise_error=False)
    except (OSError, HTTPClientError) as e:
        log.error("cannot reach the hub to change group %s: %s", team, e)
        raise TeamError(503, f"The hub could not be reached: {e}. Try again.", "hub") from e
    try:
        body = json.loads(resp.body or b"{}")
    except ValueError:
        body = {}
    if resp.code == 200 and isinstance(body, dict):
        return sorted(str(u) for u in body.get("users") or [])
    why = str(body.get("message", "")) if isinstance(body, dict) else ""
    if resp.code in (400, 404):
        raise TeamError(404, f"The hub refused: {why or 'no such user or group'}.", "not_found")
    if resp.code in (401, 403):
        log.error(
            "the hub refused to change group %s (%s %s): the nsml service's role needs the "
            "'groups' scope (load_roles in the hub's config)",
            team,
            resp.code,
            why,
        )
        raise TeamError(
            503,
            "The NSML service may not change the hub's groups; tell the operator (its role "
            "needs the 'groups' scope).",
            "hub",
        )
    log.error("the hub answered %s to a change of group %s: %s", resp.code, team, why)
    raise TeamError(503, f"The hub could not change group {team} ({resp.code}) {why}", "hub")


def record_member_change(
    s: Session, team: str, user: str, add: bool, actor: str, now: datetime
) -> None:
    """Mirror a membership change the hub made on *user*'s row (if the service has seen
    them) and audit it."""
    row = s.scalar(select(User).where(User.name == user))
    if row is not None:
        groups = [str(g) for g in row.groups or [] if g != team]
        row.groups = sorted([*groups, team]) if add else groups
    audit.record(
        s, actor, "teams.member.add" if add else "teams.member.remove", f"team:{team}",
        {"user": user}, now,
    )  # fmt: skip
