"""The live event stream: session, submission and credit changes for the caller, as they happen.

``GET api/events/stream`` (:mod:`nsml_server.api.events_stream`) answers server-sent events.
This module is what it stands on:

- :class:`StreamEvent` and :func:`sse_frame`: one event and its ``text/event-stream`` text
  (pure);
- :class:`EventBroker`: one per server process. While anyone listens, one task reads what is
  new in the database every ``poll_interval_s`` (one query for everybody, however many
  streams are open) and hands each event to the subscribers that may see it:

  * session events: the rows of ``session_events`` (every state change, failure and notice,
    the same rows as ``GET api/events``), each with the session's state *now* (state,
    reason, exit code, GPUs, queue position and reason). Their ``id`` is the row's id, so a
    client that reconnects with ``Last-Event-ID`` gets what it missed
    (:meth:`EventBroker.replay`);
  * submission events: a leaderboard submission changed state (``queued``, ``running``,
    ``scored``, ``failed``, ``stopped``); live only (no id: after a reconnect, fetch
    ``api/submissions``);
  * credit events: new rows of the credit ledger (``credit_ledger``: grants, charges,
    refunds, whichever server wrote them), one event per user account and read, with the
    balance now, the change and the newest row's reason; live only (after a reconnect,
    fetch ``api/me``). Team pools are not streamed;
  * notices: new rows of ``user_notices`` (credits low, a GPU notebook server about to be
    stopped for credits), which the billing leader writes (:func:`add_notice`), whichever
    process serves the stream; live only.

Who sees what: a user gets the events of their own sessions and submissions and their own
balance, and the session events of their teams' team sessions (visibility ``team``, a team
among their hub groups); a hub admin may ask for everyone's (``?all=1``). A subscriber that
falls more than ``queue_max`` events behind is cut off (it reconnects with ``Last-Event-ID``
and replays from the table), so a slow reader costs bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from .db import Database
from .models import (
    CreditEntry,
    PlacementRequestRow,
    SessionEvent,
    Submission,
    TrainingSession,
    User,
    UserNotice,
)
from .sessions import iso

log = logging.getLogger("nsml_server.events")

SUBMISSION_ACTIVE = ("queued", "running")
"""Submission states that may still change."""

REPLAY_PAGE = 500
"""Rows read per query when a reconnecting client replays what it missed."""


@dataclass(frozen=True)
class StreamEvent:
    """One event of the stream.

    Attributes:
        type: the SSE event name: ``session``, ``submission``, ``credit`` or ``notice``.
        user: whose it is (who may see it, with the admins).
        data: the JSON payload.
        id: the ``session_events`` row id for session events (resumable); None otherwise.
        team: for a team session's events, its team: the team's members see them too.
    """

    type: str
    user: str
    data: dict[str, Any]
    id: int | None = None
    team: str | None = None


def sse_frame(ev: StreamEvent) -> str:
    """*ev* as ``text/event-stream`` text (one JSON line of data, a blank line after)."""
    lines = []
    if ev.id is not None:
        lines.append(f"id: {ev.id}")
    lines.append(f"event: {ev.type}")
    lines.append("data: " + json.dumps(ev.data, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


def session_payload(ev: SessionEvent, row: TrainingSession | None, queue: Any) -> dict[str, Any]:
    """The data of a session event: the event as ``GET api/events`` gives it, plus the
    session's state now (None fields when the session was removed since)."""
    res = (row.resources or {}) if row is not None else {}
    return {
        "id": ev.id,
        "kind": ev.kind,
        "session": ev.session_name,
        "user": ev.user_name,
        "state": ev.state,
        "message": ev.message,
        "created": iso(ev.created) or "",
        "now": None
        if row is None
        else {
            "session_id": row.id,
            "name": row.name,
            "state": row.state,
            "reason": row.reason,
            "message": row.message,
            "exit_code": row.exit_code,
            "gpus": float(res.get("gpus", 0)),
            "gpu_ids": [str(g) for g in row.gpu_ids or []],
            "node": row.node,
            "queue_position": queue.position if queue is not None else None,
            "queue_reason": queue.message if queue is not None else None,
            "started": iso(row.started),
            "finished": iso(row.finished),
        },
    }


def submission_payload(row: Submission) -> dict[str, Any]:
    """The data of a submission event (the private score is never in it)."""
    return {
        "id": row.id,
        "dataset": row.dataset_ref,
        "user": row.user_name,
        "session": row.session_name,
        "checkpoint": row.checkpoint,
        "state": row.state,
        "score": row.public_score,
        "message": row.message,
        "finished": iso(row.finished),
    }


_Row = TypeVar("_Row", SessionEvent, CreditEntry, UserNotice)


def rows_after(s: Session, table: type[_Row], after: int) -> list[_Row]:
    """The rows of *table* with ``id > after``, oldest first, at most :data:`REPLAY_PAGE`."""
    q = select(table).where(table.id > after).order_by(table.id).limit(REPLAY_PAGE)
    return list(s.scalars(q))


def add_notice(
    s: Session, user: str, subject: str, message: str, now: datetime, level: str = "warning"
) -> None:
    """Tell *user* something that is no session's event (credits low, a GPU notebook server
    about to be stopped for credits): a ``user_notices`` row in the caller's transaction,
    which every process's stream sends to *user*'s open notebooks once it is committed."""
    s.add(UserNotice(user_name=user, subject=subject, message=message, level=level, created=now))


def notice_event(row: UserNotice) -> StreamEvent:
    """The ``notice`` event of a ``user_notices`` row: ``{subject, message, level, at}``."""
    data = {"subject": row.subject, "message": row.message, "level": row.level}
    return StreamEvent("notice", row.user_name, {**data, "at": iso(row.created)})


def credit_event(
    user: str, balance: float, change: float, reason: str, at: datetime
) -> StreamEvent:
    """*user*'s balance changed by *change* credits to *balance*, because of *reason*."""
    data = {"user": user, "balance": balance, "change": change, "reason": reason, "at": iso(at)}
    return StreamEvent("credit", user, data)


def session_events(s: Session, rows: Iterable[SessionEvent]) -> list[StreamEvent]:
    """Stream events of ``session_events`` rows, each with its session's present state."""
    out = []
    sessions: dict[int, TrainingSession | None] = {}
    for ev in rows:
        if ev.session_id not in sessions:
            sessions[ev.session_id] = s.get(TrainingSession, ev.session_id)
        row = sessions[ev.session_id]
        queue = None
        if row is not None and row.state == "queued" and row.placement_id is not None:
            p = s.get(PlacementRequestRow, row.placement_id)
            queue = p if p is not None and p.state == "waiting" else None
        team = row.team if row is not None and row.visibility == "team" else None
        payload = session_payload(ev, row, queue)
        out.append(StreamEvent("session", ev.user_name, payload, ev.id, team))
    return out


class Subscriber:
    """One open stream: a bounded queue of the events its caller may see."""

    def __init__(
        self, user: str, everyone: bool, queue_max: int, teams: frozenset[str] = frozenset()
    ) -> None:
        self.user = user
        self.everyone = everyone
        self.teams = teams
        self.queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue(queue_max + 1)
        self.queue_max = queue_max
        self.overflowed = False
        self.closed = False

    def may_see(self, ev: StreamEvent) -> bool:
        return (
            self.everyone or ev.user == self.user or (ev.team is not None and ev.team in self.teams)
        )

    def offer(self, ev: StreamEvent) -> None:
        """Queue *ev* if the caller may see it; past ``queue_max`` waiting, cut it off."""
        if self.closed or not self.may_see(ev):
            return
        if self.queue.qsize() >= self.queue_max:
            self.overflowed = True
            self.close()
            return
        self.queue.put_nowait(ev)

    def close(self) -> None:
        """End the stream: :meth:`get` answers None from now on (after what is queued)."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    async def get(self) -> StreamEvent | None:
        """The next event; None when the stream has ended."""
        if self.closed and self.queue.empty():
            return None
        return await self.queue.get()


@dataclass
class _PollState:
    last_event_id: int = 0
    last_submission_id: int = 0
    last_credit_id: int = 0
    last_notice_id: int = 0
    submissions: dict[int, str] = field(default_factory=dict)  # active id -> state
    started: bool = False


class EventBroker:
    """Reads new events from the database while anyone listens and fans them out.

    Args:
        db: the server's database.
        now: the clock (injected for tests).
        poll_interval_s: seconds between two reads of the database (one read for all
            subscribers of this process).
        queue_max: events a subscriber may have waiting before it is cut off.
    """

    def __init__(
        self,
        db: Database,
        now: Callable[[], datetime],
        poll_interval_s: float = 1.0,
        queue_max: int = 1000,
    ) -> None:
        self.db = db
        self.now = now
        self.poll_interval_s = poll_interval_s
        self.queue_max = queue_max
        self.subscribers: set[Subscriber] = set()
        self._state = _PollState()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ---- subscribers ---------------------------------------------------------------------

    async def subscribe(
        self, user: str, everyone: bool = False, teams: frozenset[str] = frozenset()
    ) -> Subscriber:
        """A new subscriber (who also sees the sessions of *teams*, the caller's groups);
        starts the reading task if it is the first."""
        if not self._state.started:
            await asyncio.to_thread(self._init_state)
        sub = Subscriber(user, everyone, self.queue_max, teams)
        self.subscribers.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget *sub*; the reading task ends when nobody is left."""
        sub.close()
        self.subscribers.discard(sub)
        if not self.subscribers:
            self._wake.set()

    @property
    def last_event_id(self) -> int:
        """The newest ``session_events`` id handed to subscribers."""
        return self._state.last_event_id

    def publish(self, ev: StreamEvent) -> None:
        """Hand *ev* to every subscriber that may see it."""
        for sub in list(self.subscribers):
            sub.offer(ev)
            if sub.closed:
                self.subscribers.discard(sub)

    def publish_credit(self, user: str, balance: float, change: float, reason: str) -> None:
        """*user*'s balance changed by *change* (credits) to *balance*, because of *reason*
        (e.g. ``charge user/mnist/3``); :meth:`poll` calls it for new ledger rows."""
        self.publish(credit_event(user, balance, change, reason, self.now()))

    # ---- reading -------------------------------------------------------------------------

    def replay(
        self,
        user: str,
        everyone: bool,
        since: int,
        until: int,
        teams: frozenset[str] = frozenset(),
    ) -> list[StreamEvent]:
        """Session events with ``since < id <= until`` that *user* (a member of *teams*)
        may see (blocking)."""
        out: list[StreamEvent] = []
        with self.db.session() as s:
            while since < until:
                q = (
                    select(SessionEvent)
                    .where(SessionEvent.id > since, SessionEvent.id <= until)
                    .order_by(SessionEvent.id)
                    .limit(REPLAY_PAGE)
                )
                if not everyone and teams:
                    team_sessions = select(TrainingSession.id).where(
                        TrainingSession.visibility == "team",
                        TrainingSession.team.in_(sorted(teams)),
                    )
                    q = q.where(
                        or_(
                            SessionEvent.user_name == user,
                            SessionEvent.session_id.in_(team_sessions),
                        )
                    )
                elif not everyone:
                    q = q.where(SessionEvent.user_name == user)
                rows = list(s.scalars(q))
                if not rows:
                    break
                out += session_events(s, rows)
                since = rows[-1].id
        return out

    def _init_state(self) -> None:
        with self.db.session() as s:
            st = self._state
            st.last_event_id = s.scalar(select(func.max(SessionEvent.id))) or 0
            st.last_submission_id = s.scalar(select(func.max(Submission.id))) or 0
            st.last_credit_id = s.scalar(select(func.max(CreditEntry.id))) or 0
            st.last_notice_id = s.scalar(select(func.max(UserNotice.id))) or 0
            active = select(Submission.id, Submission.state).where(
                Submission.state.in_(SUBMISSION_ACTIVE)
            )
            st.submissions = {row[0]: row[1] for row in s.execute(active)}
            st.started = True

    def poll(self) -> list[StreamEvent]:
        """What is new since the last call (blocking; called from the reading task)."""
        st = self._state
        out: list[StreamEvent] = []
        with self.db.session() as s:
            rows = rows_after(s, SessionEvent, st.last_event_id)
            if rows:
                out += session_events(s, rows)
                st.last_event_id = rows[-1].id
            cond = Submission.id > st.last_submission_id
            if st.submissions:
                cond = or_(cond, Submission.id.in_(list(st.submissions)))
            for sub in s.scalars(select(Submission).where(cond).order_by(Submission.id)):
                st.last_submission_id = max(st.last_submission_id, sub.id)
                if st.submissions.get(sub.id) != sub.state:
                    out.append(StreamEvent("submission", sub.user_name, submission_payload(sub)))
                if sub.state in SUBMISSION_ACTIVE:
                    st.submissions[sub.id] = sub.state
                else:
                    st.submissions.pop(sub.id, None)
            out += self._credit_events(s)
            notices = rows_after(s, UserNotice, st.last_notice_id)
            if notices:
                st.last_notice_id = notices[-1].id
                out += [notice_event(n) for n in notices]
        return out

    def _credit_events(self, s: Session) -> list[StreamEvent]:
        """One event per user account with new ledger rows since the last read."""
        st = self._state
        entries = rows_after(s, CreditEntry, st.last_credit_id)
        if not entries:
            return []
        st.last_credit_id = entries[-1].id
        changed: dict[str, tuple[int, str]] = {}
        for e in entries:
            if e.account_kind == "user":
                total, _ = changed.get(e.account, (0, ""))
                changed[e.account] = (total + e.amount_milli, e.reason)
        if not changed:
            return []
        balances = dict(
            s.execute(
                select(User.name, User.credits_milli).where(User.name.in_(list(changed)))
            ).all()
        )
        now = self.now()
        return [
            credit_event(user, balances.get(user, 0) / 1000, total / 1000, reason, now)
            for user, (total, reason) in changed.items()
        ]

    async def _run(self) -> None:
        while self.subscribers:
            try:
                for ev in await asyncio.to_thread(self.poll):
                    self.publish(ev)
            except Exception:
                log.exception("reading new events failed; trying again")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
