"""The sidebar's event stream: one upstream connection per notebook server, fanned out.

The upstream is a real HTTP server on loopback (tornado) that speaks the service's stream
format and records every connection it gets, so the tests see what the service would see.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError

from jupyter_nsml_lab.stream import Event, FanOut, Listener, SSEParser, frame, http_connect


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        ([b"id: 1\nevent: session\ndata: {}\n\n"], [Event("session", "{}", "1")]),
        ([b"id: 1\r\nevent: session\r\ndata: a\r\n\r\n"], [Event("session", "a", "1")]),
        ([b"data: a\ndata: b\n\n"], [Event("message", "a\nb")]),
        ([b": heartbeat\n\n", b"retry: 3000\n\n"], []),
        ([b"id: 7\nevent: se", b"ssion\ndata: x", b"y\n", b"\n"], [Event("session", "xy", "7")]),
        ([b"data: \xc3", b"\xa9\n\n"], [Event("message", "\u00e9")]),
        (
            [b"data:no-space\n\ndata: two\n\n"],
            [Event("message", "no-space"), Event("message", "two")],
        ),
    ],
    ids=["one", "crlf", "multi-line data", "comments only", "cut anywhere", "cut utf-8", "two"],
)
def test_the_parser_reads_events_however_the_bytes_are_cut(
    chunks: list[bytes], events: list[Event]
) -> None:
    p = SSEParser()
    got: list[Event] = []
    for c in chunks:
        got += p.feed(c)
    assert got == events


def test_frames_parse_back_to_the_same_event() -> None:
    for ev in [Event("session", '{"a":1}', "3"), Event("status", "x\ny"), Event("message", "m")]:
        assert SSEParser().feed(frame(ev).encode()) == [ev]


# ---- a real upstream ------------------------------------------------------------------------


class Upstream:
    """A loopback HTTP server with the service's ``events/stream`` route."""

    def __init__(self) -> None:
        self.connections: list[dict[str, str | None]] = []
        self.open: list[StreamHandler] = []
        self.status = 200
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        app = web.Application([(r"/api/events/stream", StreamHandler, {"upstream": self})])
        self.server = HTTPServer(app)
        self.server.add_sockets([sock])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/events/stream"

    def send(self, id_: int | None, event: str, data: dict[str, Any]) -> None:
        for h in list(self.open):
            h.queue.put_nowait(
                frame(Event(event, json.dumps(data), None if id_ is None else str(id_)))
            )

    def drop_all(self) -> None:
        for h in list(self.open):
            h.queue.put_nowait(None)

    def stop(self) -> None:
        self.drop_all()
        self.server.stop()


class StreamHandler(web.RequestHandler):
    def initialize(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def get(self) -> None:
        self.upstream.connections.append(
            {
                "authorization": self.request.headers.get("Authorization"),
                "last_event_id": self.request.headers.get("Last-Event-ID"),
            }
        )
        if self.upstream.status != 200:
            self.set_status(self.upstream.status)
            self.finish({"message": "refused by the test", "reason": "forbidden"})
            return
        self.set_header("Content-Type", "text/event-stream")
        self.upstream.open.append(self)
        try:
            self.write(": connected\n\n")
            await self.flush()
            while (text := await self.queue.get()) is not None:
                self.write(text)
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            self.upstream.open.remove(self)
        if not self.request.connection.stream.closed():  # type: ignore[attr-defined]
            self.finish()

    def on_connection_close(self) -> None:
        self.queue.put_nowait(None)  # the client went away


async def until(cond: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait for *cond* (a state, not a time: the limit only ends a broken run)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def take(listener: Listener, n: int, kinds: tuple[str, ...] = ("session",)) -> list[Event]:
    """The next *n* events of *listener* of the given kinds (others skipped)."""
    out: list[Event] = []
    while len(out) < n:
        ev = await asyncio.wait_for(listener.get(), 20)
        assert ev is not None, f"the stream ended after {out}"
        if ev.event in kinds:
            out.append(ev)
    return out


def run(test: Callable[[Upstream], Awaitable[None]]) -> None:
    async def main() -> None:
        upstream = Upstream()
        try:
            await test(upstream)
        finally:
            upstream.stop()

    asyncio.run(main())


def ids(events: list[Event]) -> list[str | None]:
    return [e.id for e in events]


# ---- fan-out --------------------------------------------------------------------------------


def test_many_browser_connections_share_one_upstream_connection() -> None:
    async def test(up: Upstream) -> None:
        fan = FanOut(http_connect(up.url, "server-token"), linger_s=0.1)
        listeners = [fan.subscribe() for _ in range(4)]
        await until(lambda: len(up.open) == 1, "the upstream connection")
        up.send(1, "session", {"session": "alice/mnist/1", "state": "running"})
        up.send(2, "session", {"session": "alice/mnist/1", "state": "completed"})
        for listener in listeners:
            got = await take(listener, 2)
            assert ids(got) == ["1", "2"]
            assert json.loads(got[1].data)["state"] == "completed"
        assert len(up.connections) == 1
        assert up.connections[0]["authorization"] == "token server-token"
        for listener in listeners:
            fan.unsubscribe(listener)
        await until(lambda: not up.open, "the upstream closed after the last listener left")
        await fan.close()

    run(test)


def test_a_browser_that_reconnects_gets_what_it_missed_from_the_buffer() -> None:
    async def test(up: Upstream) -> None:
        fan = FanOut(http_connect(up.url, "t"))
        first = fan.subscribe()
        await until(lambda: len(up.open) == 1, "the upstream connection")
        up.send(10, "hello", {})
        for i in (11, 12, 13):
            up.send(i, "session", {"n": i})
        await take(first, 3)
        # a tab reloaded after it had seen event 11
        again = fan.subscribe("11")
        assert ids(await take(again, 2)) == ["12", "13"]
        # ... and one that had seen the hello only: the buffer is complete after it
        fresh = fan.subscribe("10")
        assert ids(await take(fresh, 3)) == ["11", "12", "13"]
        up.send(14, "session", {"n": 14})
        assert ids(await take(again, 1)) == ["14"]
        assert len(up.connections) == 1
        await fan.close()

    run(test)


def test_a_browser_that_missed_more_than_the_buffer_holds_gets_reset() -> None:
    async def test(up: Upstream) -> None:
        fan = FanOut(http_connect(up.url, "t"), buffer_max=3)
        first = fan.subscribe()
        await until(lambda: len(up.open) == 1, "the upstream connection")
        up.send(1, "hello", {})
        for i in range(2, 8):
            up.send(i, "session", {"n": i})
        await take(first, 6)
        late = fan.subscribe("2")  # events 3 and 4 are no longer buffered
        assert [e.event for e in await take(late, 1, ("reset", "session"))] == ["reset"]
        fine = fan.subscribe("5")
        assert ids(await take(fine, 2)) == ["6", "7"]
        await fan.close()

    run(test)


def test_a_lost_upstream_reconnects_where_it_left_off_and_says_so() -> None:
    async def test(up: Upstream) -> None:
        fan = FanOut(http_connect(up.url, "t"), backoff_s=0.01)
        listener = fan.subscribe()
        await until(lambda: len(up.open) == 1, "the upstream connection")
        up.send(5, "session", {"n": 5})
        await take(listener, 1)
        up.drop_all()
        status = await take(listener, 1, ("status",))
        while json.loads(status[0].data)["connected"]:
            status = await take(listener, 1, ("status",))
        assert "ended the event stream" in json.loads(status[0].data)["message"]
        await until(lambda: len(up.open) == 1, "the reconnection")
        assert up.connections[-1]["last_event_id"] == "5"
        up.send(6, "session", {"n": 6})
        assert ids(await take(listener, 1)) == ["6"]
        await fan.close()

    run(test)


def test_a_refusing_service_is_reported_to_the_browser_and_retried() -> None:
    async def test(up: Upstream) -> None:
        up.status = 403
        fan = FanOut(http_connect(up.url, "t"), backoff_s=0.01, backoff_max_s=0.05)
        listener = fan.subscribe()
        status = await take(listener, 1, ("status",))
        data = json.loads(status[0].data)
        assert data["connected"] is False and "HTTP 403: refused by the test" in data["message"]
        up.status = 200
        await until(lambda: len(up.open) == 1, "the retried connection")
        up.send(1, "session", {})
        assert ids(await take(listener, 1)) == ["1"]
        await fan.close()

    run(test)


def test_a_browser_that_does_not_read_is_reset_instead_of_buffered_forever() -> None:
    async def test(up: Upstream) -> None:
        fan = FanOut(http_connect(up.url, "t"), queue_max=3)
        reader, stuck = fan.subscribe(), fan.subscribe()
        await until(lambda: len(up.open) == 1, "the upstream connection")
        for i in range(1, 11):
            up.send(i, "session", {"n": i})
            assert ids(await take(reader, 1)) == [str(i)]  # a reader that keeps up
        got = []
        while (ev := await stuck.get()) is not None:
            got.append(ev)
        assert got[-1].event == "reset" and len(got) <= 4
        assert stuck not in fan.listeners
        await fan.close()

    run(test)


def test_the_first_browser_of_a_fresh_server_resumes_through_the_service() -> None:
    async def test(up: Upstream) -> None:
        fan = FanOut(http_connect(up.url, "t"))
        listener = fan.subscribe("41")
        await until(lambda: len(up.open) == 1, "the upstream connection")
        assert up.connections[0]["last_event_id"] == "41"
        up.send(42, "session", {})
        assert ids(await take(listener, 1)) == ["42"]
        assert [e.event for e in fan.missed("41")] == ["session"]
        await fan.close()

    run(test)
