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

:class:`SSEParser` and :func:`frame` are pure; :func:`http_connect` is the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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
        while self.listeners:
            parser = SSEParser()

            def feed(chunk: bytes, parser: SSEParser = parser) -> None:
                if not self.connected:
                    self._set_connected(True, "")
                for ev in parser.feed(chunk):
                    self.publish(ev)

            self.connections += 1
            conn = asyncio.ensure_future(self.connect(self.last_id, feed))
            if not await self._until_idle(conn):
                self.connected = False
                return  # nobody listens: the connection was closed
            try:
                conn.result()
                message = "The NSML service ended the event stream."
                failures = 0
            except Exception as e:
                message = f"The NSML service's event stream failed: {describe(e)}"
                failures += 1
            if self.connected or failures == 1:
                self._set_connected(False, message)
            log.info("nsml event stream: %s", message)
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, failures - 1))
            pause = asyncio.ensure_future(asyncio.sleep(delay * (0.5 + self.rng.random() / 2)))
            if not await self._until_idle(pause):
                return

    async def _until_idle(self, work: asyncio.Future[None]) -> bool:
        """Wait for *work*; True when it finished, False when nobody listened for
        ``linger_s`` first (then *work* is cancelled: the connection closes)."""
        loop = asyncio.get_running_loop()
        idle_since: float | None = None
        while True:
            done, _ = await asyncio.wait({work}, timeout=min(0.5, self.linger_s / 4) or 0.01)
            if done:
                return True
            if self.listeners:
                idle_since = None
            elif idle_since is None:
                idle_since = loop.time()
            elif loop.time() - idle_since >= self.linger_s:
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
                return False

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
    if isinstance(e, TimeoutError):
        return "no data (not even a heartbeat) for too long"
    return str(e) or type(e).__name__


def http_connect(url: str, token: str, idle_s: float = 60.0) -> Connect:
    """:data:`Connect` for the service's ``events/stream`` at *url*, with *token*.

    A plain HTTP/1.1 GET over asyncio streams (``https`` with the system's CA bundle), so that
    the connection closes the moment nobody listens (the task is cancelled). The service
    sends a heartbeat every 15 s: *idle_s* seconds without a byte count as a dead connection.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    async def connect(last_event_id: str | None, feed: Callable[[bytes], None]) -> None:
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, limit=1 << 20), 10
        )
        try:
            head = [
                f"GET {target} HTTP/1.1",
                f"Host: {parts.netloc.rpartition('@')[2]}",
                f"Authorization: token {token}",
                "Accept: text/event-stream",
                "Cache-Control: no-cache",
                "Connection: close",
            ]
            if last_event_id is not None:
                head.append(f"Last-Event-ID: {last_event_id}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle_s)
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            if status != 200:
                body = b""
                with contextlib.suppress(Exception):
                    async for part in _body(reader, chunked, idle_s):
                        body += part
                        if len(body) > 65536:
                            break
                text = body.decode("utf-8", "replace")
                with contextlib.suppress(ValueError, AttributeError):
                    text = str(json.loads(text).get("message", text))
                raise UpstreamError(f"HTTP {status}: {text[:300]}")
            async for part in _body(reader, chunked, idle_s):
                feed(part)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return connect


class UpstreamError(Exception):
    """The service refused the stream (its status and message)."""


async def _body(reader: asyncio.StreamReader, chunked: bool, idle_s: float) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive (chunked transfer decoded); TimeoutError after
    *idle_s* seconds without any."""
    while True:
        if not chunked:
            data = await asyncio.wait_for(reader.read(65536), idle_s)
            if not data:
                return
            yield data
            continue
        size_line = await asyncio.wait_for(reader.readline(), idle_s)
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await asyncio.wait_for(reader.readexactly(size + 2), idle_s)
        yield data[:-2]
