"""Tornado handlers of the admin panel: sign-in, the admin check, XSRF, pages and forms.

Thin: each page loads plain values (:mod:`.data`, :mod:`nsml_server.credits`), renders a
template; each form checks its fields, calls one domain function (which writes the audit
row in the same transaction) and redirects back with what was done, or what was wrong.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import jinja2
from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from sqlalchemy import select
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .. import audit, credits, levels, nodes
from ..db import Database
from ..models import NODE_STATES, PERMISSION_LEVELS, Team, TeamAdmin, User
from ..teams import TeamError, change_hub_group, may_manage, record_member_change
from . import charts, data, views

log = logging.getLogger("nsml_server.admin")

FLASH_COOKIE = "nsml-admin-flash"
"""The cookie that carries a form's outcome to the page shown next."""

PAGES = [
    ("users", "Users"),
    ("teams", "Teams"),
    ("nodes", "Nodes"),
    ("sessions", "Sessions & servers"),
    ("policy", "Credit policy"),
    ("charts", "Cluster charts"),
    ("audit", "Audit log"),
]
"""The panel's pages, in the order of its navigation bar: (path under admin/, title)."""


def make_templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("nsml_server.admin", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["credits"] = views.credits_text
    env.filters["duration"] = views.duration_text
    env.filters["mib"] = views.mib_text
    env.filters["when"] = lambda t: t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"
    env.filters["gpus"] = lambda g: f"{g:g}"
    return env


@dataclass
class AdminContext:
    """What the panel's handlers share."""

    panel: Any  # AdminPanel
    db: Database
    base_url: str
    now: Callable[[], datetime]
    wake_runner: Callable[[], None]
    oauth: Any  # HubOAuth, or None when the hub's variables are missing
    oauth_problem: str = ""
    templates: jinja2.Environment = field(default_factory=make_templates)

    @property
    def admin_url(self) -> str:
        return self.base_url + "admin/"


class AdminPage(HubOAuthenticated, web.RequestHandler):  # type: ignore[misc]
    """Base of every admin page: hub sign-in, hub admins only, XSRF on every post."""

    def initialize(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        if ctx.oauth is not None:
            self.hub_auth = ctx.oauth
        self.admin_name = ""

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "same-origin")

    async def prepare(self) -> None:
        if self.ctx.oauth is None:
            raise web.HTTPError(503, f"The admin panel is off: {self.ctx.oauth_problem}.")
        if self.request.method not in ("GET", "HEAD"):
            try:
                self.check_xsrf_cookie()
            except web.HTTPError:
                raise web.HTTPError(
                    403,
                    "This form was refused: its XSRF token is missing or wrong. Reload the "
                    "page and send the form again.",
                ) from None
        try:
            model = await self.ctx.oauth.get_user(self, sync=False)
        except (HTTPClientError, ConnectionError, OSError) as e:
            log.error("cannot reach the JupyterHub API to check a sign-in: %s", e)
            raise web.HTTPError(503, "The hub could not be reached; try again in a moment.") from e
        if not model:
            if self.request.method in ("GET", "HEAD"):
                self.redirect(self.get_login_url())
                return
            raise web.HTTPError(403, "Sign in at the hub first, then send the form again.")
        self._hub_auth_user_cache = model
        self.current_user = model
        name = str(model.get("name", "?"))
        if model.get("kind", "user") != "user" or not model.get("admin"):
            log.warning(
                "admin panel: %s %s refused to %s", self.request.method, self.request.path, name
            )
            raise web.HTTPError(
                403,
                f"The NSML admin panel is for hub admins; {name} is not one. Ask an admin "
                "for what you need, or go back to the hub.",
            )
        self.admin_name = name

    # ---- rendering -------------------------------------------------------------------------

    def render_page(self, template: str, page: str, **values: Any) -> None:
        t = self.ctx.templates.get_template(template)
        self.finish(
            t.render(
                page=page,
                pages=PAGES,
                admin_url=self.ctx.admin_url,
                hub_prefix=self.hub_prefix,
                admin=self.admin_name,
                xsrf=self.xsrf_token.decode()
                if isinstance(self.xsrf_token, bytes)
                else self.xsrf_token,
                **self.take_flash(),
                **values,
            )
        )

    @property
    def hub_prefix(self) -> str:
        return str(getattr(self.ctx.oauth, "hub_prefix", "/hub/") or "/hub/")

    def back(self, path: str, *, done: str = "", error: str = "") -> None:
        """Redirect (303) to the panel page *path*, which then shows *done* or *error*.

        The message travels in a signed cookie, read once, not in the URL: a link made
        elsewhere cannot put words of its own on the panel."""
        self.set_signed_cookie(
            FLASH_COOKIE,
            json.dumps({"done": done, "error": error}),
            expires_days=None,
            path=self.ctx.admin_url,
            httponly=True,
            samesite="Strict",
        )
        self.redirect(f"{self.ctx.admin_url}{path}", status=303)

    def take_flash(self) -> dict[str, str]:
        """The message :meth:`back` left for this page (once), as ``done`` and ``error``."""
        raw = self.get_signed_cookie(FLASH_COOKIE, max_age_days=1)
        if raw is None:
            return {"done": "", "error": ""}
        self.clear_cookie(FLASH_COOKIE, path=self.ctx.admin_url)
        try:
            value = json.loads(raw)
        except ValueError:
            return {"done": "", "error": ""}
        return {"done": str(value.get("done", "")), "error": str(value.get("error", ""))}

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        elif status_code >= 500:
            incident = uuid.uuid4().hex[:12]
            log.error("incident %s on %s %s", incident, self.request.method, self.request.path)
            message = f"Internal error (incident {incident}); the operator's log has details."
        else:
            message = self._reason
        t = self.ctx.templates.get_template("error.html")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            t.render(
                status=status_code,
                title={403: "Admins only", 404: "Not found", 503: "Unavailable"}.get(
                    status_code, "Error"
                ),
                message=message,
                hub_prefix=self.hub_prefix,
                admin_url=self.ctx.admin_url,
            )
        )


class Home(AdminPage):
    def get(self) -> None:
        self.redirect(self.ctx.admin_url + "users")


# ---- users ----------------------------------------------------------------------------------


class Users(AdminPage):
    """``admin/users``: every user NSML knows, level, balance, burn rate, GPUs held."""

    def get(self) -> None:
        now = self.ctx.now()
        with self.ctx.db.session() as s:
            held = data.gpus_held(s)
            rows = []
            for u in s.scalars(select(User).order_by(User.name)):
                rows.append(
                    {
                        "name": u.name,
                        "level": levels.level_of(u, u.permission == "admin"),
                        "balance": credits.balance_milli(s, u.name),
                        "burn": credits.burn_rate_milli_per_hour(s, u.name, now),
                        "gpus": held.get(u.name, 0.0),
                        "groups": list(u.groups or []),
                        "billing_team": u.billing_team,
                        "last_seen": u.last_seen,
                    }
                )
        self.render_page("users.html", "users", users=rows)


class UserDetail(AdminPage):
    """``admin/users/NAME``: balance, grant or set credits, usage by day, the ledger."""

    def get(self, name: str) -> None:
        now = self.ctx.now()
        days = self.ctx.panel.usage_days
        with self.ctx.db.session() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                raise web.HTTPError(
                    404, f"NSML has not seen a user named {name!r} yet (users appear on first use)."
                )
            balance = credits.balance_milli(s, name)
            burn = credits.burn_rate_milli_per_hour(s, name, now)
            charged = credits.usage_by_day(s, name, days, now)
            since = now.replace(hour=0, minute=0, second=0, microsecond=0)
            gpu_hours = views.usage_by_day(
                data.intervals(s, since - _days(days), user=name), days, now
            )
            ledger = [
                {
                    "id": e.id,
                    "created": e.created,
                    "kind": e.kind,
                    "amount": e.amount_milli,
                    "reason": e.reason,
                    "actor": e.actor,
                }
                for e in credits.history(s, name, self.ctx.panel.page_size)
            ]
            teams_of_user = [
                t.name
                for t in s.scalars(select(Team).order_by(Team.name))
                if t.name in (user.groups or [])
            ]
            info = {
                "name": user.name,
                "hub_admin": user.permission == "admin",
                "level": levels.level_of(user, user.permission == "admin"),
                "stored_level": user.level,
                "teams": teams_of_user,
                "groups": list(user.groups or []),
                "billing_team": user.billing_team,
                "max_gpus": user.max_gpus,
                "max_running": user.max_running,
                "priority": user.priority,
                "last_seen": user.last_seen,
                "created": user.created,
            }
        usage = [
            {"day": str(d), "credits": c, "gpu_hours": g}
            for (d, c), (_, g) in zip(charged, gpu_hours, strict=True)
        ]
        script, div = charts.usage_chart(
            [str(d) for d, _ in charged], [c / 1000 for _, c in charged], [g for _, g in gpu_hours]
        )
        self.render_page(
            "user.html",
            "users",
            user=info,
            balance=balance,
            burn=burn,
            hours_left=(balance / burn if burn > 0 else None),
            usage=usage,
            ledger=ledger,
            bokeh=charts.bokeh_resources(),
            chart_script=script,
            chart_div=div,
        )


def _days(n: int) -> Any:
    from datetime import timedelta

    return timedelta(days=n)


def optional_int(form: dict[str, str], key: str, label: str) -> int | None:
    """A whole number typed in a form; blank is None ("the level's" / "no cap")."""
    raw = form.get(key, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{label}: {raw!r} is not a whole number (leave it blank for none)."
        ) from None


class UserLevel(AdminPage):
    """``POST admin/users/NAME/level``: level, limit overrides (blank: the level's), and the
    team whose pool pays (blank: the user)."""

    def post(self, name: str) -> None:
        page = f"users/{quote(name)}"
        form = {
            k: self.get_body_argument(k, "")
            for k in ("level", "max_gpus", "max_running", "priority", "billing_team")
        }
        try:
            overrides = {
                "max_gpus": optional_int(form, "max_gpus", "Most GPUs at once"),
                "max_running": optional_int(form, "max_running", "Most running sessions"),
                "priority": optional_int(form, "priority", "Queue priority"),
            }
        except ValueError as e:
            return self.back(page, error=str(e))
        now = self.ctx.now()
        try:
            with self.ctx.db.session() as s:
                user = s.scalar(select(User).where(User.name == name))
                if user is None:
                    raise web.HTTPError(404, f"No user named {name!r}.")
                changed = {k: v for k, v in overrides.items() if getattr(user, k) != v}
                level = form["level"] if form["level"] != user.level else None
                if level is not None or changed:
                    levels.set_user_level(
                        s, name, self.admin_name, now, level=level, overrides=changed
                    )
                team = form["billing_team"] or None
                if team != user.billing_team:
                    levels.set_billing_team(s, name, team, self.admin_name, now)
        except credits.CreditError as e:
            return self.back(page, error=e.message)
        self.back(page, done=f"Saved the level, limits and billing of {name}.")


class UserCredits(AdminPage):
    """``POST admin/users/NAME/credits``: ``mode`` grant (add the amount; negative deducts)
    or set (grant the difference to reach the amount), ``amount`` in credits, ``reason``."""

    def post(self, name: str) -> None:
        page = f"users/{quote(name)}"
        mode = self.get_body_argument("mode", "grant")
        reason = self.get_body_argument("reason", "").strip()
        try:
            amount = views.parse_credits(self.get_body_argument("amount", ""))
        except ValueError as e:
            return self.back(page, error=str(e))
        if mode not in ("grant", "set"):
            return self.back(page, error=f"Unknown mode {mode!r}; use grant or set.")
        now = self.ctx.now()
        try:
            with self.ctx.db.session() as s:
                if s.scalar(select(User.id).where(User.name == name)) is None:
                    raise web.HTTPError(404, f"No user named {name!r}.")
                if mode == "set":
                    # The difference is read and written in one transaction, the account
                    # locked: a charge meanwhile is not undone (see credits.set_balance).
                    entry = credits.set_balance(s, name, amount, reason, self.admin_name, now)
                else:
                    entry = credits.grant(s, name, amount, reason, self.admin_name, now)
                delta = entry.amount_milli
                after = credits.balance_milli(s, name)
        except credits.CreditError as e:
            return self.back(page, error=e.message)
        verb = "Granted" if delta > 0 else "Deducted"
        self.back(
            page,
            done=f"{verb} {views.credits_text(abs(delta))} credits "
            f"{'to' if delta > 0 else 'from'} {name}; balance {views.credits_text(after)}.",
        )


# ---- teams ----------------------------------------------------------------------------------


class Teams(AdminPage):
    """``admin/teams``: teams, whether they pay, their pools, admins and members; the level
    limits."""

    def get(self) -> None:
        with self.ctx.db.session() as s:
            members: dict[str, list[str]] = {}
            payers: dict[str, list[str]] = {}
            for u in s.scalars(select(User).order_by(User.name)):
                for g in u.groups or []:
                    members.setdefault(str(g), []).append(u.name)
                if u.billing_team:
                    payers.setdefault(u.billing_team, []).append(u.name)
            admins: dict[int, list[str]] = {}
            for ta in s.scalars(select(TeamAdmin).order_by(TeamAdmin.user_name)):
                admins.setdefault(ta.team_id, []).append(ta.user_name)
            teams = [
                {
                    "name": t.name,
                    "pays": t.pays,
                    "balance": t.credits_milli,
                    "admins": admins.get(t.id, []),
                    "members": members.get(t.name, []),
                    "billed": payers.get(t.name, []),
                }
                for t in s.scalars(select(Team).order_by(Team.name))
            ]
            known = {t["name"] for t in teams}
            groups_only = sorted(g for g in members if g not in known)
            limits = levels.level_limits(s)
            level_rows = [
                {
                    "level": name,
                    "max_gpus": limits[name].max_gpus,
                    "max_running": limits[name].max_running,
                    "priority": limits[name].priority,
                }
                for name in PERMISSION_LEVELS
                if name in limits
            ]
        self.render_page(
            "teams.html", "teams", teams=teams, groups_only=groups_only, levels=level_rows
        )


class TeamCreate(AdminPage):
    """``POST admin/teams/new`` ``name``, ``pays``: make a hub group an NSML team."""

    def post(self) -> None:
        name = self.get_body_argument("name", "").strip()
        pays = self.get_body_argument("pays", "") == "1"
        if not name:
            return self.back("teams", error="Name the hub group that becomes a team.")
        with self.ctx.db.session() as s:
            if levels.get_team(s, name) is not None:
                return self.back("teams", error=f"Team {name} exists already.")
            levels.set_team(s, name, self.admin_name, self.ctx.now(), pays=pays)
        self.back(
            "teams", done=f"Team {name} created; its pool {'pays' if pays else 'does not pay'}."
        )


class TeamPays(AdminPage):
    """``POST admin/teams/NAME/pays`` ``pays=1|0``: whether members billed to it draw from
    its pool."""

    def post(self, name: str) -> None:
        pays = self.get_body_argument("pays", "") == "1"
        with self.ctx.db.session() as s:
            if levels.get_team(s, name) is None:
                return self.back("teams", error=f"No team named {name!r}.")
            levels.set_team(s, name, self.admin_name, self.ctx.now(), pays=pays)
        self.back("teams", done=f"Team {name}: its pool {'pays' if pays else 'no longer pays'}.")


class TeamAdmins(AdminPage):
    """``POST admin/teams/NAME/admins`` ``user``, ``admin=1|0``."""

    def post(self, name: str) -> None:
        user = self.get_body_argument("user", "").strip()
        make = self.get_body_argument("admin", "1") == "1"
        if not user:
            return self.back("teams", error="Name the user.")
        try:
            with self.ctx.db.session() as s:
                levels.set_team_admin(s, name, user, make, self.admin_name, self.ctx.now())
        except credits.CreditError as e:
            return self.back("teams", error=e.message)
        self.back(
            "teams", done=f"{user} is {'now' if make else 'no longer'} an admin of team {name}."
        )


class TeamMembers(AdminPage):
    """``POST admin/teams/NAME/members`` ``user``, ``member=1|0``: add the user to the team's
    hub group or remove them (the hub keeps membership; the service asks it)."""

    async def post(self, name: str) -> None:
        user = self.get_body_argument("user", "").strip()
        add = self.get_body_argument("member", "1") == "1"
        if not user:
            return self.back("teams", error="Name the user.")
        try:
            with self.ctx.db.session() as s:
                may_manage(s, name, self.admin_name, True)
            oauth = self.ctx.oauth
            await change_hub_group(oauth.api_url, oauth.api_token, name, user, add)
            with self.ctx.db.session() as s:
                record_member_change(s, name, user, add, self.admin_name, self.ctx.now())
        except TeamError as e:
            return self.back("teams", error=e.message)
        self.back("teams", done=f"{user} is {'now' if add else 'no longer'} in team {name}.")


class LevelLimitsForm(AdminPage):
    """``POST admin/levels/LEVEL``: the level's limits (blank: no cap)."""

    def post(self, level: str) -> None:
        form = {k: self.get_body_argument(k, "") for k in ("max_gpus", "max_running", "priority")}
        try:
            limits = levels.Limits(
                max_gpus=optional_int(form, "max_gpus", "Most GPUs at once"),
                max_running=optional_int(form, "max_running", "Most running sessions"),
                priority=optional_int(form, "priority", "Queue priority") or 0,
            )
            with self.ctx.db.session() as s:
                levels.set_level_limits(s, level, limits, self.admin_name, self.ctx.now())
        except ValueError as e:
            return self.back("teams", error=str(e))
        except credits.CreditError as e:
            return self.back("teams", error=e.message)
        self.back("teams", done=f"Saved the limits of level {level}.")


class TeamCredits(AdminPage):
    """``POST admin/teams/NAME/credits``: grant to (or, negative, deduct from) a team's pool."""

    def post(self, name: str) -> None:
        reason = self.get_body_argument("reason", "").strip()
        try:
            amount = views.parse_credits(self.get_body_argument("amount", ""))
        except ValueError as e:
            return self.back("teams", error=str(e))
        try:
            with self.ctx.db.session() as s:
                credits.grant(s, name, amount, reason, self.admin_name, self.ctx.now(), team=True)
                after = credits.balance_milli(s, name, team=True)
        except credits.CreditError as e:
            return self.back("teams", error=e.message)
        self.back(
            "teams",
            done=f"Team {name}: {'+' if amount > 0 else ''}{views.credits_text(amount)} credits; "
            f"pool {views.credits_text(after)}.",
        )


# ---- nodes ----------------------------------------------------------------------------------


class Nodes(AdminPage):
    """``admin/nodes``: nodes and their GPUs (model, memory, use, allocation), drain/undrain."""

    def get(self) -> None:
        now = self.ctx.now()
        with self.ctx.db.session() as s:
            out = [nodes.node_out(n, now) for n in nodes.list_nodes(s)]
        self.render_page("nodes.html", "nodes", nodes=out, states=NODE_STATES)


class NodeState(AdminPage):
    """``POST admin/nodes/NAME/state`` ``state=draining|up|down``."""

    def post(self, name: str) -> None:
        state = self.get_body_argument("state", "")
        try:
            with self.ctx.db.session() as s:
                before = getattr(nodes.get_node(s, name), "state", None)
                data.set_node_state(s, name, state, self.admin_name, self.ctx.now())
        except data.AdminError as e:
            return self.back("nodes", error=e.message)
        what = {"draining": "drained", "up": "undrained", "down": "marked down"}[state]
        self.back("nodes", done=f"Node {name} {what} (was {before}).")


# ---- sessions and notebook servers --------------------------------------------------------------


class Sessions(AdminPage):
    """``admin/sessions``: active sessions and running notebook servers, each with a stop."""

    def get(self) -> None:
        now = self.ctx.now()
        with self.ctx.db.session() as s:
            sessions = data.running_sessions(s)
            servers = data.notebook_servers(s)
        self.render_page("sessions.html", "sessions", sessions=sessions, servers=servers, now=now)


class SessionStop(AdminPage):
    """``POST admin/sessions/stop`` ``name=USER/DATASET/N``: SIGTERM, grace, then SIGKILL."""

    def post(self) -> None:
        name = self.get_body_argument("name", "")
        try:
            with self.ctx.db.session() as s:
                data.stop_session(s, name, self.admin_name, self.ctx.now())
        except data.AdminError as e:
            return self.back("sessions", error=e.message)
        self.ctx.wake_runner()
        self.back(
            "sessions",
            done=f"Stop requested for {name}: it gets SIGTERM and its grace period to save.",
        )


class ServerStop(AdminPage):
    """``POST admin/servers/stop`` ``user=NAME&server=SERVER``: the hub stops the notebook
    server (the user's files stay in their home)."""

    async def post(self) -> None:
        user = self.get_body_argument("user", "")
        server = self.get_body_argument("server", "")
        if not user:
            return self.back("sessions", error="Name the user whose server to stop.")
        oauth = self.ctx.oauth
        path = f"/users/{quote(user, safe='')}/" + (
            f"servers/{quote(server, safe='')}" if server else "server"
        )
        req = HTTPRequest(
            oauth.api_url.rstrip("/") + path,
            method="DELETE",
            headers={"Authorization": f"token {oauth.api_token}"},
            request_timeout=60,
        )
        try:
            resp = await AsyncHTTPClient().fetch(req, raise_error=False)
        except (OSError, HTTPClientError) as e:
            return self.back("sessions", error=f"The hub could not be reached: {e}")
        status = resp.code
        if status not in (202, 204):
            try:
                why = json.loads(resp.body or b"{}").get("message", "")
            except ValueError:
                why = ""
            return self.back(
                "sessions",
                error=f"The hub refused to stop the server of {user} ({status}) {why}".strip(),
            )
        with self.ctx.db.session() as s:
            data.record_server_stop(s, user, server, self.admin_name, self.ctx.now(), status)
        label = f"{user}/{server}" if server else user
        verb = "stopping" if status == 202 else "stopped"
        self.back("sessions", done=f"Server {label} {verb}; its files stay in the home.")


# ---- credit policy --------------------------------------------------------------------------

POLICY_FIELDS = [
    (
        "gpu_hour",
        "Credits per GPU-hour",
        "for GPU models without a rate of their own; a GPU share pays its fraction",
    ),
    ("cpu_hour", "Credits per CPU-hour", "per whole CPU core"),
    ("memory_gb_hour", "Credits per GiB-hour of memory", ""),
    (
        "warn_threshold",
        "Warn at a balance of (credits)",
        "users get one warning when their balance falls to it",
    ),
]


class PolicyPage(AdminPage):
    """``admin/policy``: the credit policy in force, and the form to change it."""

    def get(self) -> None:
        with self.ctx.db.session() as s:
            policy = credits.get_policy(s)
            models = sorted({g.model for n in nodes.list_nodes(s) for g in n.gpus})
        self.render_page(
            "policy.html",
            "policy",
            policy=policy,
            fields=POLICY_FIELDS,
            models=models,
            by_model="\n".join(
                f"{m} = {views.credits_text(r)}"
                for m, r in sorted(policy.gpu_hour_milli_by_model.items())
            ),
        )

    def post(self) -> None:
        form = {
            k: self.get_body_argument(k, "")
            for k in (
                "gpu_hour",
                "cpu_hour",
                "memory_gb_hour",
                "warn_threshold",
                "interval_s",
                "admission_min_hours",
                "by_model",
            )
        }
        try:
            values = policy_values(form)
        except ValueError as e:
            return self.back("policy", error=str(e))
        try:
            with self.ctx.db.session() as s:
                policy = credits.policy_from_dict(values, credits.get_policy(s))
                credits.set_policy(s, policy, self.admin_name, self.ctx.now())
        except credits.CreditError as e:
            return self.back("policy", error=e.message)
        self.back("policy", done="The credit policy is changed; the next billing pass uses it.")


def policy_values(form: dict[str, str]) -> dict[str, Any]:
    """The policy fields of the policy form (credits as typed, rates per model one
    ``MODEL = CREDITS`` a line). Raises ValueError with a sentence naming the field."""
    out: dict[str, Any] = {}
    for key, label, _ in POLICY_FIELDS:
        try:
            out[f"{key}_milli"] = views.parse_credits(form[key])
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
    try:
        out["interval_s"] = int(form["interval_s"])
    except ValueError:
        raise ValueError(
            f"Billing interval: {form['interval_s']!r} is not a whole number of seconds."
        ) from None
    try:
        out["admission_min_hours"] = float(form["admission_min_hours"])
    except ValueError:
        raise ValueError(
            f"Admission minimum: {form['admission_min_hours']!r} is not a number of hours."
        ) from None
    by_model: dict[str, int] = {}
    for n, line in enumerate(form["by_model"].splitlines(), 1):
        if not line.strip():
            continue
        model, sep, rate = line.rpartition("=")
        if not sep or not model.strip():
            raise ValueError(
                f"Rates per GPU model, line {n}: write MODEL = CREDITS, not {line.strip()!r}."
            )
        try:
            by_model[model.strip()] = views.parse_credits(rate)
        except ValueError as e:
            raise ValueError(f"Rates per GPU model, line {n}: {e}") from None
    out["gpu_hour_milli_by_model"] = by_model
    return out


# ---- charts ---------------------------------------------------------------------------------


class Charts(AdminPage):
    """``admin/charts[?hours=H]``: GPUs allocated over time (by kind, against capacity) and
    the GPUs' use over time (from the sessions' GPU-use samples)."""

    def get(self) -> None:
        raw = self.get_query_argument("hours", "")
        hours = self.ctx.panel.chart_hours
        if raw:
            try:
                hours = float(raw)
            except ValueError:
                hours = -1
            if not 0 < hours <= 24 * 90:
                raise web.HTTPError(400, f"hours={raw!r}: give a number of hours from 0 to 2160.")
        now = self.ctx.now()
        start, end = data.window(now, hours)
        with self.ctx.db.session() as s:
            ivs = data.intervals(s, start)
            capacity = data.capacity_gpus(s)
            samples = data.use_samples(s, start)
        series = {
            kind: views.allocation_steps(ivs, start, end, kind)
            for kind in ("session", "notebook", "evaluation")
            if any(iv.kind == kind for iv in ivs)
        }
        series["total"] = views.allocation_steps(ivs, start, end)
        a_script, a_div = charts.allocation_chart(series, capacity, start, end)
        bucket = hours * 3600 / self.ctx.panel.chart_buckets
        epoch = datetime(1970, 1, 1)
        times, means, weight = views.use_buckets(
            samples, (start - epoch).total_seconds(), (end - epoch).total_seconds(), bucket
        )
        u_script, u_div = charts.use_chart(times, means, bucket, start, end)
        held_now = series["total"][1][-1]
        self.render_page(
            "charts.html",
            "charts",
            hours=hours,
            capacity=capacity,
            held_now=held_now,
            holders=len([iv for iv in ivs if iv.end is None]),
            samples=len(samples),
            reported_gpu_hours=round(sum(weight) / 3600, 2),
            bokeh=charts.bokeh_resources(),
            charts=[(a_script, a_div), (u_script, u_div)],
        )


# ---- audit log ------------------------------------------------------------------------------


class Audit(AdminPage):
    """``admin/audit[?before=ID]``: every admin action, newest first, a page at a time."""

    def get(self) -> None:
        raw = self.get_query_argument("before", "")
        before = None
        if raw:
            if not raw.isdigit():
                raise web.HTTPError(400, f"before={raw!r}: give an entry number.")
            before = int(raw)
        size = self.ctx.panel.page_size
        with self.ctx.db.session() as s:
            rows = [
                {
                    "id": e.id,
                    "created": e.created,
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "detail": views.detail_lines(audit.detail_of(e)),
                }
                for e in audit.recent(s, size + 1, before)
            ]
        more = len(rows) > size
        rows = rows[:size]
        self.render_page(
            "audit.html",
            "audit",
            entries=rows,
            next_before=rows[-1]["id"] if more and rows else None,
            first=before is None,
        )


class OAuthCallback(HubOAuthCallbackHandler):  # type: ignore[misc]
    """Where the hub sends an admin back after signing in (``BASE_URL oauth_callback``)."""

    def initialize(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        if ctx.oauth is not None:
            self.hub_auth = ctx.oauth

    async def get(self) -> None:
        if self.ctx.oauth is None:
            raise web.HTTPError(503, f"The admin panel is off: {self.ctx.oauth_problem}.")
        await super().get()


def routes(ctx: AdminContext) -> list[tuple[Any, ...]]:
    """The panel's tornado routes."""
    a = ctx.admin_url
    k = {"ctx": ctx}
    name = r"([^/]+)"
    callback = ctx.base_url + "oauth_callback"
    if ctx.oauth is not None:
        from urllib.parse import urlparse

        callback = urlparse(ctx.oauth.oauth_redirect_uri).path or callback
    return [
        (callback, OAuthCallback, k),
        (a.rstrip("/"), Home, k),
        (a, Home, k),
        (a + "users", Users, k),
        (a + f"users/{name}", UserDetail, k),
        (a + f"users/{name}/credits", UserCredits, k),
        (a + f"users/{name}/level", UserLevel, k),
        (a + "teams", Teams, k),
        (a + "teams/new", TeamCreate, k),
        (a + f"teams/{name}/credits", TeamCredits, k),
        (a + f"teams/{name}/pays", TeamPays, k),
        (a + f"teams/{name}/admins", TeamAdmins, k),
        (a + f"teams/{name}/members", TeamMembers, k),
        (a + f"levels/{name}", LevelLimitsForm, k),
        (a + "nodes", Nodes, k),
        (a + f"nodes/{name}/state", NodeState, k),
        (a + "sessions", Sessions, k),
        (a + "sessions/stop", SessionStop, k),
        (a + "servers/stop", ServerStop, k),
        (a + "policy", PolicyPage, k),
        (a + "charts", Charts, k),
        (a + "audit", Audit, k),
        (a + ".*", NotFound, k),
    ]


class NotFound(AdminPage):
    """Any other path under ``admin/`` (after the admin check: non-admins learn nothing)."""

    def get(self) -> None:
        raise web.HTTPError(404, f"No admin page {self.request.path}.")

    post = get
