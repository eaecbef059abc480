"""Node loss: when the work on a silent node is given up, and what is swept when it returns.

The rule, in one place (the operator's guide states it too):

- A node is **late** once it has sent no heartbeat for ``node_timeout`` seconds: it is marked
  ``down`` and receives no new work, but the work on it is still its own. The session runner
  keeps following its sessions; when the node's engine does not answer it waits (the session
  stays ``running``, with a notice in its events) instead of failing it.
- A node is **gone** once it has been silent for ``node_timeout + node_lost_grace`` seconds
  *and* its engine does not answer for the work in question. Only then is that work given up:
  a session ends ``lost`` (or, asked with ``restart_on_lost``, is queued again as its next
  attempt from its last checkpoint), a notebook server's allocation is released (the hub's
  poll reports the server stopped), and the GPUs go back to the ledger, once.
  If the engine answers that the container is gone, the session is lost at once, late or not.
  If the engine answers that the container still runs, nothing is lost, however long the
  agent has been silent.
- A node that was gone is **fenced** (``needs_sweep``): when it heartbeats again it is ``up``
  but receives nothing new until the server has removed, from its engine, the containers of
  work the platform no longer runs there (the orphan sweep: containers that carry this
  deployment's label and belong to an ended or moved session, or to a released allocation).
  Released GPUs are therefore never given to new work while a container that may still use
  them runs.

The functions at the top are pure (plain values in, plain values out); the ones below take a
SQLAlchemy session and leave the transaction to the caller.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from . import ledger
from .models import Allocation, Node, PlacementRequestRow, TrainingSession

log = logging.getLogger("nsml_server.nodes")

#: Container labels the platform sets (sessions by the runner, notebook servers by the spawner).
LABEL_SESSION_ID = "org.jupyter-nsml.session-id"
LABEL_ATTEMPT = "org.jupyter-nsml.attempt"
LABEL_SERVER = "org.jupyter-nsml.server"
LABEL_ALLOCATION = "org.jupyter-nsml.allocation"
#: Holders of allocations that a runner follows (sessions; leaderboard evaluations): their
#: runner, which asks the engine first, ends them, not the node check.
RUNNER_HOLDERS = (":session/", ":evaluation/")


class Verdict(enum.Enum):
    """What the platform may assume about a node from its silence."""

    ALIVE = "alive"  # heard within node_timeout
    LATE = "late"  # silent past node_timeout: down, no new work; its work is still its own
    GONE = "gone"  # silent past node_timeout + node_lost_grace: its unconfirmed work is lost


def node_verdict(
    last_heartbeat: datetime | None, now: datetime, timeout_s: float, grace_s: float
) -> Verdict:
    """The node's verdict from the age of its last heartbeat (None: never heard: gone)."""
    if last_heartbeat is None:
        return Verdict.GONE
    silent = (now - last_heartbeat).total_seconds()
    if silent < timeout_s:
        return Verdict.ALIVE
    if silent < timeout_s + grace_s:
        return Verdict.LATE
    return Verdict.GONE


@dataclass(frozen=True)
class LostPlan:
    """What becomes of a lost session: requeued (next *attempt*, loading *load_from*) or
    ended ``lost``; *event* is the line of its event log, *message* the session's message."""

    requeue: bool
    attempt: int
    load_from: str | None
    event: str
    message: str


def plan_lost_session(
    *,
    name: str,
    cause: str,
    restart_on_lost: bool,
    attempt: int,
    max_attempts: int,
    last_checkpoint: str | None,
    load_from: str | None,
) -> LostPlan:
    """Requeue or end a session whose run was lost (pure).

    *cause* is a clause saying what happened (``node node-b lost (...)``). A session asked
    with ``restart_on_lost`` is queued again while its attempts stay below *max_attempts*,
    loading its last checkpoint (``NAME/CHECKPOINT``), else what its attempt loaded (a fork's
    parent checkpoint), else starting over.
    """
    if restart_on_lost and attempt < max_attempts:
        source = f"{name}/{last_checkpoint}" if last_checkpoint else load_from
        start = (
            f"from checkpoint {last_checkpoint}"
            if last_checkpoint
            else (f"loading {source}" if source else "from the start (it saved no checkpoint)")
        )
        event = f"{cause}; session requeued as attempt {attempt + 1} {start}"
        return LostPlan(True, attempt + 1, source, event, event)
    limit = (
        f" It was not requeued: it reached {max_attempts} attempts, the limit."
        if restart_on_lost
        else ""
    )
    message = (
        f"{cause[:1].upper()}{cause[1:]}; the session's outcome is unknown.{limit} Resume it "
        f"from its last checkpoint with: nsml resume {name}"
    )
    return LostPlan(False, attempt, load_from, f"{cause}; session lost", message)


@dataclass(frozen=True)
class SessionView:
    """What the sweep needs to know about one session."""

    state: str
    attempt: int
    node: str | None
    handle: str | None


def orphan_reason(
    labels: Mapping[str, str],
    container_id: str,
    node: str,
    sessions: Mapping[int, SessionView],
    active_allocations: Mapping[int, str],
) -> str | None:
    """Why a container of this deployment found on *node* is an orphan, or None to keep it.

    *sessions* maps the session ids named by the containers' labels to their records (absent:
    deleted); *active_allocations* maps active allocation ids to their node's name. A
    container without a session or allocation label is never an orphan (not ours to judge).
    """
    sid = labels.get(LABEL_SESSION_ID, "")
    if sid.isdigit():
        row = sessions.get(int(sid))
        if row is None:
            return "its session was deleted"
        if row.state not in ("preparing", "running"):
            return f"its session is {row.state}"
        if str(row.attempt) != labels.get(LABEL_ATTEMPT):
            return f"its session moved on to attempt {row.attempt}"
        if row.node != node:
            return f"its session runs on {row.node}"
        if row.state == "running" and row.handle and row.handle != container_id:
            return "its session follows another container"
        return None
    aid = labels.get(LABEL_ALLOCATION, "")
    if aid.isdigit():
        where = active_allocations.get(int(aid))
        if where is None:
            return "its allocation was released"
        if where != node:
            return f"its allocation is on {where}"
    return None


# ---- the database side -------------------------------------------------------------------------


def release_lost_allocations(
    s: Session, scheduler: object, now: datetime, timeout_s: float, grace_s: float
) -> list[str]:
    """Release the active allocations of notebook servers (and other holders no runner
    follows) on gone nodes, and fence those nodes. Sessions and evaluations are their
    runners' (they ask the engine first).

    Returns the holders released. Idempotent: a released allocation is not released again.
    """
    out: list[str] = []
    rows = s.execute(
        select(Allocation.id, Allocation.holder, Node.name, Node.id, Node.last_heartbeat)
        .join(Node, Node.id == Allocation.node_id)
        .where(Allocation.state == "active", Node.state == "down")
    ).all()
    for aid, holder, node, node_id, hb in rows:
        if any(kind in holder for kind in RUNNER_HOLDERS):
            continue
        if node_verdict(hb, now, timeout_s, grace_s) is not Verdict.GONE:
            continue
        req = s.scalar(select(PlacementRequestRow).where(PlacementRequestRow.allocation_id == aid))
        if req is not None:
            released = bool(scheduler.release(s, req))  # type: ignore[attr-defined]
        else:
            released = ledger.release(s, aid, now)
        if released:
            fence(s, node_id)
            log.warning("node %s lost: allocation %d of %s released", node, aid, holder)
            out.append(holder)
    return out


def fence(s: Session, node_id: int) -> None:
    """Give the node nothing new until the orphan sweep ran (see the module documentation)."""
    s.execute(
        update(Node)
        .where(Node.id == node_id)
        .values(needs_sweep=True)
        .execution_options(synchronize_session=False)
    )


def session_views(s: Session, ids: set[int]) -> dict[int, SessionView]:
    if not ids:
        return {}
    return {
        sid: SessionView(state, attempt, node, handle)
        for sid, state, attempt, node, handle in s.execute(
            select(
                TrainingSession.id,
                TrainingSession.state,
                TrainingSession.attempt,
                TrainingSession.node,
                TrainingSession.handle,
            ).where(TrainingSession.id.in_(ids))
        )
    }


def active_allocations(s: Session, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return {
        aid: name
        for aid, name in s.execute(
            select(Allocation.id, Node.name)
            .join(Node, Node.id == Allocation.node_id)
            .where(Allocation.id.in_(ids), Allocation.state == "active")
        )
    }
