"""One upstream event stream per notebook server, fanned out to every browser connection.

The NSML service's ``GET api/events/stream`` is a server-sent-event stream of the user's
session, submission and credit events. However many sidebars and tabs a user opens, the
notebook server holds **one** connection to it (:class:`FanOut`) and copies each event to
each browser connection (:class:`Listener`):

- the upstream connection opens with the first listener and closes ``linger_s`` seconds
  after the last one leaves (a page reload does not cost a reconnect);
- when it drops, it reconnects with ``Last-Event-ID`` (the service replays what was missed)
  after a jittered exponential backoff, and tells the listeners with a ``status`` event
  (``{"connected": false, "message": ...}``, then ``{"connected": true}``);
- the last ``buffer_max`` events are kept, so a browser that reconnects with its
  ``Last-Event-ID`` gets what it missed from here; when the buffer no longer reaches back that
  far it gets ``event: reset`` (reload what you show);
- a listener more than ``queue_max`` events behind gets ``reset`` and is closed (bounded
  memory whatever the browser does).

:class:`SSEParser` and :func:`frame` are pure; the connection uses tornado's HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

log = logging.getLogger("jupyter_nsml_lab.stream")


@dataclass(frozen=True)
class Event:
    """One server-sent event: its name, its data (text) and its id (None: no ``id`` field)."""

    event: str
    data: str
    id: str | None = None

    @property
    def int_id(self) -> int | None:
        try:
            return int(self.id) if self.id is not None else None
        except ValueError:
            return None


def frame(ev: Event) -> str:
    """*ev* as ``text/event-stream`` text."""
    lines = [f"id: {ev.id}"] if ev.id is not None else []
    if ev.event != "message":
        lines.append(f"event: {ev.event}")
    lines += [f"data: {line}" for line in ev.data.split("\n")]
    return "\n".join(lines) + "\n\n"


def control(event: str, data: dict[str, Any]) -> Event:
    """An event this extension sends itself (``status``, ``reset``)."""
    return Event(event, json.dumps(data, separators=(",", ":")))


class SSEParser:
    """Incremental parser of ``text/event-stream`` bytes (the WHATWG rules that matter here:
    ``\\n``, ``\\r\\n`` or ``\\r`` line ends, comments, multi-line data, ``id`` kept per
    event)."""

    def __init__(self) -> None:
        self._buf = ""
        self._pending = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by *chunk*."""
        raw = self._pending + chunk
        try:
            text = raw.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as e:  # a character cut between two chunks
            text = raw[: e.start].decode("utf-8")
            self._pending = raw[e.start :]
        self._buf += text.replace("\r\n", "\n").replace("\r", "\n")
        out: list[Event] = []
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    def _line(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._event, self._id = "", None
                return None
            ev = Event(self._event or "message", "\n".join(self._data), self._id)
            self._data, self._event, self._id = [], "", None
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self._id = value
        return None


class Listener:
    """One browser connection: a bounded queue of events; None ends it."""

    def __init__(self, queue_max: int) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(queue_max + 2)
        self.queue_max = queue_max
        self.closed = False

    def offer(self, ev: Event) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= self.queue_max:
            self.queue.put_nowait(control("reset", {"message": "Too many events waiting."}))
            self.close()
            return
        self.queue.put_nowait(ev)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    async def get(self) -> Event | None:
        return await self.queue.get()


Connect = Callable[[str | None, Callable[[bytes], None]], Awaitable[None]]
"""Opens the upstream stream with a ``Last-Event-ID`` (or None), feeds what arrives to the
callback and returns when the stream ends (raises on failure)."""


class FanOut:
    """The notebook server's one upstream connection and its listeners.

    Args:
        connect: opens the upstream (see :data:`Connect`); :func:`http_connect` in production.
        buffer_max: events kept for browsers that reconnect.
        queue_max: events a listener may have waiting before it is reset.
        linger_s: seconds the upstream stays open after the last listener left.
        backoff_s: first wait before reconnecting; doubles to *backoff_max_s*, jittered.
    """

    def __init__(
        self,
        connect: Connect,
        *,
        buffer_max: int = 1000,
        queue_max: int = 1000,
        linger_s: float = 30.0,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.connect = connect
        self.buffer: deque[Event] = deque(maxlen=buffer_max)
        self.queue_max = queue_max
        self.linger_s = linger_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.rng = rng or random.Random()
        self.listeners: set[Listener] = set()
        self.last_id: str | None = None
        """The newest upstream event id: where a reconnect resumes."""
        self.complete_after: int | None = None
        """The buffer holds every event with an id above this one (None: not known)."""
        self.connected = False
        self.connections = 0
        """Upstream connections opened so far (one per notebook server while it stays up)."""
        self._task: asyncio.Task[None] | None = None

    # ---- listeners -----------------------------------------------------------------------

    def subscribe(self, last_event_id: str | None = None) -> Listener:
        """A new listener, with the buffered events after *last_event_id* queued (or
        ``reset`` when the buffer does not reach back to it); opens the upstream if needed."""
        if self.connections == 0 and self.last_id is None and _is_int(last_event_id):
            # The first browser of a fresh notebook server resumes: so does the upstream
            # (the service replays what the browser missed).
            self.last_id = last_event_id
            self.complete_after = int(str(last_event_id))
        listener = Listener(self.queue_max)
        for ev in self.missed(last_event_id):
            listener.offer(ev)
        if self.connected:
            listener.offer(control("status", {"connected": True}))
        self.listeners.add(listener)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        listener.close()
        self.listeners.discard(listener)

    def missed(self, last_event_id: str | None) -> list[Event]:
        """What a browser that saw up to *last_event_id* has missed, from the buffer."""
        if last_event_id is None or last_event_id == "":
            return []
        try:
            last = int(last_event_id)
        except ValueError:
            return [control("reset", {"message": f"Unknown event id {last_event_id[:40]!r}."})]
        events = list(self.buffer)
        start = None
        for i, ev in enumerate(events):
            n = ev.int_id
            if n is not None and n <= last:
                start = i + 1
        if start is None:
            if self.complete_after is not None and last >= self.complete_after:
                start = 0
            else:
                return [control("reset", {"message": "Events were missed; reload."})]
        return events[start:]

    def publish(self, ev: Event) -> None:
        """Keep *ev* in the buffer and hand it to every listener."""
        if len(self.buffer) == self.buffer.maxlen and self.buffer:
            dropped = self.buffer[0].int_id
            if dropped is not None:
                self.complete_after = dropped
        self.buffer.append(ev)
        if ev.event == "hello" and self.complete_after is None:
            # The service's first event names the newest id it had: everything after it
            # comes through this connection.
            self.complete_after = ev.int_id
        if ev.id is not None:
            self.last_id = ev.id
        self._broadcast(ev)

    def _broadcast(self, ev: Event) -> None:
        for listener in list(self.listeners):
            listener.offer(ev)
            if listener.closed:
                self.listeners.discard(listener)

    # ---- the upstream --------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self.listeners:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_listener(), self.linger_s)
                if not self.listeners:
                    return
            parser = SSEParser()

            def feed(chunk: bytes, parser: SSEParser = parser) -> None:
                if not self.connected:
                    self._set_connected(True, "")
                for ev in parser.feed(chunk):
                    self.publish(ev)

            self.connections += 1
            try:
                await self.connect(self.last_id, feed)
                message = "The NSML service ended the event stream."
                failures = 0
            except Exception as e:
                message = f"The NSML service's event stream failed: {describe(e)}"
                failures += 1
            if self.connected or failures == 1:
                self._set_connected(False, message)
            log.info("nsml event stream: %s", message)
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, failures - 1))
            await asyncio.sleep(delay * (0.5 + self.rng.random() / 2))

    async def _wait_listener(self) -> None:
        while not self.listeners:
            await asyncio.sleep(0.05)

    def _set_connected(self, connected: bool, message: str) -> None:
        self.connected = connected
        data: dict[str, Any] = {"connected": connected}
        if message:
            data["message"] = message
        self._broadcast(control("status", data))

    async def close(self) -> None:
        """Stop the upstream and end every listener (the server is shutting down)."""
        for listener in list(self.listeners):
            self.unsubscribe(listener)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _is_int(value: str | None) -> bool:
    try:
        int(str(value))
    except ValueError:
        return False
    return True


def describe(e: BaseException) -> str:
    if isinstance(e, HTTPClientError) and e.response is not None and e.response.body:
        try:
            body = json.loads(e.response.body)
            return f"HTTP {e.code}: {body.get('message', '')}".strip()
        except (ValueError, AttributeError):
            pass
    return str(e) or type(e).__name__


def http_connect(url: str, token: str, timeout_s: float = 3600.0) -> Connect:
    """:data:`Connect` for the service's ``events/stream`` at *url*, with *token*.

    The connection is renewed every *timeout_s* seconds at the latest (with
    ``Last-Event-ID``, nothing is lost): the service's heartbeats keep it busy, so a stuck
    one would otherwise never be noticed.
    """

    async def connect(last_event_id: str | None, feed: Callable[[bytes], None]) -> None:
        headers = {"Authorization": f"token {token}", "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        status: list[int] = []
        body: list[bytes] = []

        def on_header(line: str) -> None:
            if line.startswith("HTTP/"):
                status[:] = [int(line.split()[1])]

        def on_chunk(chunk: bytes) -> None:
            if status and status[0] == 200:
                feed(chunk)
            elif sum(map(len, body)) < 65536:
                body.append(chunk)

        req = HTTPRequest(
            url,
            headers=headers,
            connect_timeout=10,
            request_timeout=timeout_s,
            header_callback=on_header,
            streaming_callback=on_chunk,
            follow_redirects=False,
        )
        try:
            await AsyncHTTPClient().fetch(req)
        except HTTPClientError as e:
            if e.code == 599 and status and status[0] == 200:
                return  # our own timeout: renew
            if status and status[0] != 200:
                text = b"".join(body).decode("utf-8", "replace")
                try:
                    text = str(json.loads(text).get("message", text))
                except (ValueError, AttributeError):
                    pass
                raise RuntimeError(f"HTTP {status[0]}: {text[:300]}") from None
            raise

    return connect
