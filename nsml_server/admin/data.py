"""What the admin panel reads from the database and the few things it changes there.

Plain functions over a SQLAlchemy session, in the caller's transaction; the handlers call
them and render the result. Every change an admin makes here also writes an audit row
(:func:`nsml_server.audit.record`) in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from .. import audit, nodes
from ..models import NODE_STATES, SESSION_ACTIVE_STATES, Allocation, Node, SessionGpuUse
from ..models import TrainingSession as SessionRow
from ..sessions import add_event
from .views import Interval, UseSample, holder_kind, server_name


class AdminError(Exception):
    """An admin action that cannot be done; *message* says why and what to do."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def allocation_gpus(a: Allocation) -> float:
    """GPUs an allocation holds (shares count as fractions)."""
    return len(a.gpu_indices or []) * a.gpu_milli_per_gpu / 1000


def intervals(
    s: Session, since: datetime, user: str | None = None, gpus_only: bool = True
) -> list[Interval]:
    """What held GPUs at any time since *since* (of *user*, when given), as plain intervals."""
    q = select(Allocation).where(or_(Allocation.released.is_(None), Allocation.released >= since))
    if user is not None:
        q = q.where(Allocation.user_name == user)
    out = []
    for a in s.scalars(q):
        gpus = allocation_gpus(a)
        if gpus_only and gpus <= 0:
            continue
        out.append(Interval(a.created, a.released, gpus, holder_kind(a.holder)))
    return out


def capacity_gpus(s: Session) -> float:
    """Whole GPUs on nodes that take work now (state ``up``)."""
    return float(sum(len(n.gpus) for n in nodes.list_nodes(s, "up")))


def use_samples(s: Session, since: datetime) -> list[UseSample]:
    """Every GPU-use sample of sessions since *since* (``session_gpu_use``)."""
    start = (since - datetime(1970, 1, 1)).total_seconds()
    out = []
    for use in s.scalars(select(SessionGpuUse)):
        for smp in use.samples or []:
            if float(smp.get("t", 0)) >= start:
                util = [float(u) for u in smp.get("u") or [] if u is not None]
                out.append(UseSample(float(smp["t"]), float(smp.get("w") or 0), util))
    return out


@dataclass
class RunningWork:
    """A running session or notebook server, as the sessions page lists it."""

    kind: str  # "session" | "notebook" | "evaluation" | "other"
    user: str
    name: str  # session name, or the server name ("" for the default server)
    state: str
    node: str | None
    gpus: float
    gpu_ids: list[Any]
    cpu_milli: int
    memory_mib: int
    since: datetime | None
    stop_requested: bool = False


def running_sessions(s: Session) -> list[RunningWork]:
    """Sessions that are queued, preparing or running, oldest first."""
    rows = s.scalars(
        select(SessionRow)
        .where(SessionRow.state.in_(SESSION_ACTIVE_STATES))
        .order_by(SessionRow.id)
    )
    out = []
    for r in rows:
        res = r.resources or {}
        out.append(
            RunningWork(
                kind="session",
                user=r.user_name,
                name=r.name,
                state=r.state,
                node=r.node,
                gpus=float(res.get("gpus") or 0),
                gpu_ids=list(r.gpu_ids or []),
                cpu_milli=int(res.get("cpu_milli") or 0),
                memory_mib=int(res.get("memory_mib") or 0),
                since=r.started or r.created,
                stop_requested=r.stop_requested,
            )
        )
    return out


def notebook_servers(s: Session) -> list[RunningWork]:
    """Notebook servers that hold an allocation now, oldest first."""
    rows = s.execute(
        select(Allocation, Node.name)
        .join(Node, Node.id == Allocation.node_id)
        .where(Allocation.state == "active", Allocation.released.is_(None))
        .order_by(Allocation.id)
    ).all()
    out = []
    for a, node in rows:
        name = server_name(a.holder)
        if name is None:
            continue
        out.append(
            RunningWork(
                kind="notebook",
                user=a.user_name,
                name=name,
                state="running",
                node=node,
                gpus=allocation_gpus(a),
                gpu_ids=list(a.gpu_indices or []),
                cpu_milli=a.cpu_milli,
                memory_mib=a.memory_mib,
                since=a.created,
            )
        )
    return out


def gpus_held(s: Session) -> dict[str, float]:
    """GPUs each user holds now."""
    held: dict[str, float] = {}
    for a in s.scalars(select(Allocation).where(Allocation.released.is_(None))):
        held[a.user_name] = held.get(a.user_name, 0.0) + allocation_gpus(a)
    return held


def set_node_state(s: Session, name: str, state: str, actor: str, now: datetime) -> Node:
    """Drain (``draining``: running work stays, nothing new is placed), undrain (``up``) or
    mark down a node, as the API's ``PATCH nodes/NAME`` does, with an audit row."""
    if state not in NODE_STATES:
        raise AdminError(f"Invalid node state {state!r}; valid states: {', '.join(NODE_STATES)}.")
    node = nodes.get_node(s, name)
    if node is None:
        raise AdminError(f"No node named {name!r}.", 404)
    before = node.state
    nodes.log.info("node %s: state %s -> %s by %s", name, before, state, actor)
    node.state = state
    audit.record(s, actor, "node.state", f"node:{name}", {"before": before, "after": state}, now)
    return node


def stop_session(s: Session, name: str, actor: str, now: datetime) -> SessionRow:
    """Ask the session runner to stop session *name* (SIGTERM, the grace period for
    ``nsml.save``, then SIGKILL), as ``POST api/sessions/NAME/stop`` does, with an audit row."""
    row = s.scalar(select(SessionRow).where(SessionRow.name == name))
    if row is None:
        raise AdminError(f"No session named {name!r}.", 404)
    if row.state not in SESSION_ACTIVE_STATES:
        raise AdminError(f"Session {name} is already {row.state}.", 409)
    if not row.stop_requested:
        row.stop_requested = True
        add_event(s, row, "notice", f"stop requested by {actor} (admin)", now)
    audit.record(s, actor, "session.stop", f"session:{name}", {"state": row.state}, now)
    return row


def record_server_stop(
    s: Session, user: str, server: str, actor: str, now: datetime, status: int
) -> None:
    """The audit row of a notebook server stopped from the panel (the hub answered *status*)."""
    audit.record(
        s,
        actor,
        "server.stop",
        f"server:{user}/{server}" if server else f"server:{user}",
        {"hub_status": status},
        now,
    )


def window(now: datetime, hours: float) -> tuple[datetime, datetime]:
    """``(now - hours, now)``."""
    return now - timedelta(hours=hours), now
