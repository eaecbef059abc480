"""REST handlers: health, the caller, nodes."""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from .. import credits, levels, nodes
from ..models import NODE_STATES, Allocation, Node, User
from ..schemas import Health, Heartbeat, MeOut, NodeList, NodePatch, UsageItem, UsageOut
from .base import APIError, APIHandler
from .routes import parse_datetime

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_node_name(name: str) -> str:
    if not NODE_NAME.match(name):
        raise APIError(
            400,
            f"Invalid node name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            "bad_request",
        )
    return name


class HealthHandler(APIHandler):
    """``GET api/health`` — no authentication; for load balancers and the hub."""

    auth_required = False

    def get(self) -> None:
        db_state = "ok"
        try:
            with self.ctx.db.session() as s:
                s.execute(text("SELECT 1"))
        except Exception:
            db_state = "unreachable"
        self.write_json(
            Health(
                status="ok" if db_state == "ok" else "degraded",
                version=self.ctx.version,
                database=db_state,
                schema_revision=self.ctx.schema_revision,
                backend=self.ctx.backend.get("kind"),
                leader=self.ctx.is_leader(),
                deployment=self.ctx.deployment,
            ),
            status=200 if db_state == "ok" else 503,
        )


def touch_user(
    s: Session,
    name: str,
    admin: bool,
    now: datetime,
    credits_milli: int,
    groups: list[str] | None = None,
) -> User:
    """The NSML user row for hub user *name*, created on first contact (its opening balance
    *credits_milli* written as a ledger grant); *groups* (the hub's) are mirrored."""
    user = credits.ensure_user(s, name, now, credits_milli)
    user.permission = "admin" if admin else "user"
    user.last_seen = now
    if groups is not None and list(user.groups or []) != groups:
        user.groups = groups
    return user


class MeHandler(APIHandler):
    """``GET api/me`` — the caller: name, permission level, credits, burn rate."""

    def get(self) -> None:
        assert self.hub_user is not None
        with self.ctx.db.session() as s:
            user = touch_user(
                s,
                self.user_name,
                self.is_admin,
                self.ctx.now(),
                self.ctx.default_credits_milli,
                list(self.hub_user.get("groups") or []),
            )
            out = MeOut(
                name=user.name,
                admin=self.is_admin,
                permission="admin" if self.is_admin else user.level,  # type: ignore[arg-type]
                credits=user.credits_milli / 1000,
                groups=list(self.hub_user.get("groups") or []),
                scopes=list(self.hub_user.get("scopes") or []),
                team_admin_of=levels.teams_administered(s, user.name),
                burn_rate=credits.user_burn_rate_milli_per_hour(s, user.name, self.ctx.now())
                / credits.MILLI,
            )
        self.write_json(out)


class NodesHandler(APIHandler):
    """``GET api/nodes[?state=up|draining|down]`` — nodes and their GPUs.

    Node internals (how the server reaches a node's engine) are shown to admins and trusted
    services only (:meth:`NodeOut.for_caller`)."""

    def get(self) -> None:
        state = self.get_query_argument("state", None)
        if state is not None and state not in NODE_STATES:
            raise APIError(
                400,
                f"Invalid state {state!r}; valid states: {', '.join(NODE_STATES)}.",
                "bad_request",
            )
        now = self.ctx.now()
        with self.ctx.db.session() as s:
            out = NodeList(
                nodes=[
                    nodes.node_out(n, now).for_caller(self.is_admin)
                    for n in nodes.list_nodes(s, state)
                ]
            )
        self.write_json(out)


class NodeHandler(APIHandler):
    """``GET api/nodes/NAME``; ``PATCH`` (admin) ``{"state": "draining"|"up"|"down"}``."""

    def get(self, name: str) -> None:
        check_node_name(name)
        with self.ctx.db.session() as s:
            node = nodes.get_node(s, name)
            if node is None:
                raise APIError(404, f"No node named {name!r}.", "not_found")
            out = nodes.node_out(node, self.ctx.now()).for_caller(self.is_admin)
        self.write_json(out)

    def patch(self, name: str) -> None:
        self.require_admin()
        check_node_name(name)
        patch = self.body_as(NodePatch)
        with self.ctx.db.session() as s:
            node = nodes.get_node(s, name)
            if node is None:
                raise APIError(404, f"No node named {name!r}.", "not_found")
            nodes.log.info(
                "node %s: state %s -> %s by %s", name, node.state, patch.state, self.user_name
            )
            node.state = patch.state
            out = nodes.node_out(node, self.ctx.now())
        self.write_json(out)


class HeartbeatHandler(APIHandler):
    """``PUT api/nodes/NAME/heartbeat`` (admin or node agent token) — a node's report."""

    async def put(self, name: str) -> None:
        self.require_admin()
        check_node_name(name)
        hb = self.body_as(Heartbeat, schema_if_converted=True)  # its schema adds no rule
        if self.ctx.heartbeats is not None:  # many per transaction, off the event loop
            out = await self.ctx.heartbeats.submit((name, hb))
        else:
            with self.ctx.db.session() as s:
                node = nodes.apply_heartbeat(s, name, hb, self.ctx.now(), self.ctx.gpu_use)
                s.flush()
                out = nodes.node_out(node, self.ctx.now())
        self.write_json(out)


def usage_kind(holder: str) -> str:
    """What an allocation held: a notebook server, a training session, or something else."""
    if holder == "notebook" or holder.startswith("notebook:"):
        return "notebook"
    if holder.startswith("session/"):
        return "session"
    return "other"


class UsageHandler(APIHandler):
    """``GET api/usage[?user=NAME][&since=ISO]``: the GPU time a user's allocations held.

    Every notebook server and session holds an allocation from placement to release; its GPUs
    times its duration is the GPU time that credit accounting charges. An active allocation
    counts up to now. Other users' usage needs an admin.
    """

    def get(self) -> None:
        user = self.get_query_argument("user", None) or self.user_name
        if user != self.user_name:
            self.require_admin()
        raw = self.get_query_argument("since", None)
        since = parse_datetime(raw) if raw else None
        if raw and since is None:
            raise APIError(
                400,
                f"since={raw!r} is not a date; use ISO 8601, e.g. 2026-11-01T00:00:00Z.",
                "bad_request",
            )
        now = self.ctx.now()
        with self.ctx.db.session() as s:
            q = (
                select(Allocation, Node.name)
                .join(Node, Node.id == Allocation.node_id)
                .where(Allocation.user_name == user)
                .order_by(Allocation.id)
            )
            if since is not None:
                q = q.where((Allocation.released.is_(None)) | (Allocation.released >= since))
            rows = s.execute(q).all()
        items: list[UsageItem] = []
        totals = {"notebook": 0.0, "session": 0.0, "other": 0.0}
        for a, node in rows:
            holder = a.holder.split(":", 1)[-1] if a.holder.startswith(f"{user}:") else a.holder
            gpus = len(a.gpu_indices) * a.gpu_milli_per_gpu / 1000
            start = max(a.created, since) if since is not None else a.created
            end = a.released or now
            seconds = max(0.0, (end - start).total_seconds()) * gpus
            kind = usage_kind(holder)
            totals[kind] += seconds
            items.append(
                UsageItem(
                    allocation=a.id,
                    holder=holder,
                    kind=kind,  # type: ignore[arg-type]
                    node=node,
                    gpus=gpus,
                    started=a.created.isoformat() + "Z",
                    ended=a.released.isoformat() + "Z" if a.released else None,
                    gpu_seconds=round(seconds, 3),
                )
            )
        self.write_json(
            UsageOut(
                user=user,
                since=since.isoformat() + "Z" if since else None,
                gpu_seconds={k: round(v, 3) for k, v in totals.items()},
                items=items,
            )
        )
