"""``GET api/events/stream``: the caller's events as server-sent events (see :mod:`..events`).

The answer is ``text/event-stream`` and does not end while the client listens:

- first a ``retry`` line and a ``: connected`` comment;
- then, when the client sends ``Last-Event-ID`` (a browser's ``EventSource`` does so by
  itself when it reconnects) or ``?since=ID``, the session events it missed;
- then ``event: hello`` whose id is the newest event id the server had when the stream
  began (everything up to it was replayed or is older than the client's id; everything after
  it follows on this stream);
- then every new event the caller may see, as it happens, and a ``: heartbeat`` comment
  every ``heartbeat_s`` seconds of quiet (so that proxies keep the connection and the client
  notices a dead one);
- a client that falls too far behind gets ``event: reset`` and the end of the stream; it
  reconnects and replays.

Errors before the stream begins (token, parameters) are JSON like every other route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from tornado.iostream import StreamClosedError

from ..events import EventBroker, Subscriber, sse_frame
from .base import APIError, APIHandler, ServerContext
from .routes import INT32_MAX, Route

RETRY_MS = 3000
"""How long a browser waits before reconnecting (the stream's ``retry`` field)."""


class EventStreamHandler(APIHandler):
    """``GET api/events/stream[?since=ID&all=1]`` (``Last-Event-ID`` header)."""

    def initialize(  # type: ignore[override]
        self, ctx: ServerContext, broker: EventBroker, heartbeat_s: float = 15.0
    ) -> None:
        super().initialize(ctx)
        self.broker = broker
        self.heartbeat_s = heartbeat_s
        self.sub: Subscriber | None = None

    def _since(self) -> int:
        raw = self.request.headers.get("Last-Event-ID") or self.get_query_argument("since", "0")
        try:
            since = int(raw.strip() or "0")
        except ValueError:
            raise APIError(
                400,
                f"Last-Event-ID must be an event id (an integer), not {raw[:40]!r}.",
                "bad_request",
            ) from None
        if not 0 <= since <= INT32_MAX:
            raise APIError(400, f"Last-Event-ID {since} is out of range.", "bad_request")
        return since

    async def get(self) -> None:
        since = self._since()
        everyone = self.get_query_argument("all", "0") in ("1", "true")
        if everyone:
            self.require_admin()
        teams = frozenset(str(g) for g in (self.hub_user or {}).get("groups") or ())
        self.sub = sub = await self.broker.subscribe(self.user_name, everyone, teams)
        try:
            self.set_header("Content-Type", "text/event-stream; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.set_header("X-Accel-Buffering", "no")
            self.write(f"retry: {RETRY_MS}\n: connected\n\n")
            await self.flush()
            until = self.broker.last_event_id
            if since:
                for old in await asyncio.to_thread(
                    self.broker.replay, self.user_name, everyone, since, until, teams
                ):
                    self.write(sse_frame(old))
            # Everything up to `until` is sent (or was before the client reconnected): the
            # hello carries it as its id, so a client that reconnects resumes from there.
            sent = max(since, until)
            hello = {"user": self.user_name, "last_id": sent}
            self.write(f"id: {sent}\nevent: hello\ndata: {json.dumps(hello)}\n\n")
            await self.flush()
            while True:
                try:
                    ev = await asyncio.wait_for(sub.get(), self.heartbeat_s)
                except TimeoutError:
                    self.write(": heartbeat\n\n")
                    await self.flush()
                    continue
                if ev is None:
                    if sub.overflowed:
                        data = {"message": "Too many events waiting; reconnect to catch up."}
                        self.write("event: reset\ndata: " + json.dumps(data) + "\n\n")
                    break
                if ev.id is not None and ev.id <= sent:
                    continue  # already sent by the replay
                self.write(sse_frame(ev))
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            self.broker.unsubscribe(sub)
        with contextlib.suppress(StreamClosedError):
            self.finish()

    def on_connection_close(self) -> None:
        if self.sub is not None:
            self.broker.unsubscribe(self.sub)


def event_routes(ctx: ServerContext | None, broker: EventBroker | None) -> list[Route]:
    """The routes of this module (paths as the OpenAPI document writes them)."""
    return [Route("/events/stream", EventStreamHandler, {"ctx": ctx, "broker": broker})]
