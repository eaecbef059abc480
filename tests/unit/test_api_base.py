"""What every API route gets from the base handler: deep JSON refused, answers that reach a
client still sending its body, ``Allow`` on 405, node internals for admins only."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from tornado import web
from tornado.httpserver import HTTPServer

from nsml_server.api import base
from nsml_server.api.base import APIError, APIHandler, json_too_deep, parse_json
from nsml_server.schemas import NodeOut, PlacementIn, memory_mib

# ---- deep JSON ---------------------------------------------------------------------------------


def nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


@pytest.mark.parametrize(
    ("body", "too_deep"),
    [
        (b"{}", False),
        (b'{"a": [1, 2, {"b": [[3]]}]}', False),
        (nested(base.MAX_JSON_DEPTH), False),
        (nested(base.MAX_JSON_DEPTH + 1), True),
        (nested(100_000), True),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, True),
        (b'["' + b"[" * 100_000 + b'"]', False),  # brackets inside a string do not nest
        (b'["\\"' + b"[" * 1000 + b'"]', False),  # nor after an escaped quote
        (b"[" * 100_000, True),  # unbalanced and deep: a parser would recurse
        (b"[}", False),  # unbalanced but shallow: the parser says what is wrong
        (b"[1, 2] ]", False),
    ],
    ids=lambda v: repr(v[:24]) if isinstance(v, bytes) else str(v),
)
def test_json_deeper_than_the_bound_is_recognised_without_parsing(
    body: bytes, too_deep: bool
) -> None:
    assert json_too_deep(body) is too_deep


@pytest.mark.parametrize("depth", [base.MAX_JSON_DEPTH + 1, 1000, 10_000, 1_000_000])
def test_parsing_deep_json_is_a_400_never_a_recursion_error(depth: int) -> None:
    with pytest.raises(APIError) as e:
        parse_json(nested(depth, '{"a":', "}").replace(b'{"a":}', b"{}"))
    assert e.value.status_code == 400
    assert str(base.MAX_JSON_DEPTH) in e.value.message


def test_parse_json_names_a_syntax_error() -> None:
    with pytest.raises(APIError) as e:
        parse_json(b'{"a": }')
    assert e.value.status_code == 400 and "not valid JSON" in e.value.message


# ---- body rules that the document states ---------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "ok"),
    [
        *[(0, True), (0.001, True), (0.5, True), (1, True), (2.0, True), (256, True)],
        *[(0.0004, False), (1.5, False), (257, False), (-1, False)],
    ],
)
def test_gpu_asks_follow_the_documented_rule(gpus: float, ok: bool) -> None:
    if ok:
        PlacementIn(holder="h", gpus=gpus)
    else:
        with pytest.raises(ValidationError):
            PlacementIn(holder="h", gpus=gpus)


@pytest.mark.parametrize(
    ("memory", "mib"),
    [
        *[("1G", 1024), ("512M", 512), ("16GiB", 16384), (" 2 g ", 2048), ("0.5M", 0)],
        *[(0, 0), (7, 7), ("1.5T", 1536 * 1024), ("1024K", 1), ("8gb", 8192)],
    ],
)
def test_memory_asks_in_the_documented_forms_are_read_in_mib(memory: str | int, mib: int) -> None:
    assert memory_mib(PlacementIn(holder="h", memory=memory).memory) == mib


@pytest.mark.parametrize("memory", ["", "-1G", "1 X", "1e3", "nan", -1, 2**51])
def test_memory_asks_in_other_forms_are_refused(memory: str | int) -> None:
    with pytest.raises(ValidationError):
        PlacementIn(holder="h", memory=memory)


def node(**kw: Any) -> NodeOut:
    values: dict[str, Any] = {
        "name": "n",
        "state": "up",
        "backend": "docker",
        "docker_url": "tcp://n.internal:2376",
        "cpu_milli": 1000,
        "memory_mib": 1024,
        "gpu_probe": {},
        "gpus": [],
        "images": [],
        "labels": {},
        "last_heartbeat": None,
        "heartbeat_age_s": None,
    }
    return NodeOut(**{**values, **kw})


def test_node_internals_are_shown_to_admins_and_blanked_for_users() -> None:
    assert node().for_caller(admin=True).docker_url == "tcp://n.internal:2376"
    hidden = node().for_caller(admin=False)
    assert hidden.docker_url is None
    assert hidden.model_dump(exclude={"docker_url"}) == node().model_dump(exclude={"docker_url"})


# ---- a real tornado server: early answers, Allow --------------------------------------------


@web.stream_request_body
class RefusingUpload(APIHandler):
    """A streamed upload that refuses every request before reading its body (like a bad
    token on a code upload)."""

    auth_required = False
    received = 0

    async def prepare(self) -> None:
        raise APIError(401, "Missing or invalid token.", "unauthenticated")

    def data_received(self, chunk: bytes) -> None:
        RefusingUpload.received += len(chunk)

    def put(self) -> None:
        self.write_json({"stored": True}, 201)


class GetOnly(APIHandler):
    auth_required = False

    def get(self) -> None:
        self.write_json({"ok": True})

    def delete(self) -> None:
        self.write_json({"ok": True})


@pytest.fixture()
def server() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    app = web.Application(
        [("/up", RefusingUpload, {"ctx": None}), ("/get", GetOnly, {"ctx": None})]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()

    async def start() -> HTTPServer:
        http = HTTPServer(app)
        http.listen(port, "127.0.0.1")
        return http

    http = loop.run_until_complete(start())
    import threading

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(http.stop)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the answer"
        rest += chunk
    return status, headers, rest[:length]


def test_a_refusal_before_the_body_reaches_a_client_still_sending_and_keeps_the_connection(
    server: int,
) -> None:
    body = b"x" * (8 << 20)
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        for _ in range(3):  # the same connection serves the next request
            sock.sendall(
                b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            status, headers, payload = read_response(sock)
            assert status == 401
            assert headers["content-type"].startswith("application/json")
            assert "close" not in headers.get("connection", "")
            assert set(json.loads(payload)) == {"message", "reason"}
    assert RefusingUpload.received == 0, "a refused body must not reach the handler"


def test_a_refusal_of_a_body_over_the_linger_bound_says_it_closes(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        size = base.LINGER_MAX_BYTES + 1
        sock.sendall(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        status, headers, payload = read_response(sock)
    assert status == 401 and headers["connection"] == "close"
    assert json.loads(payload)["reason"] == "unauthenticated"


def test_a_refusal_with_expect_100_continue_is_answered_without_waiting_for_the_body(
    server: int,
) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(
            b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        status, headers, _ = read_response(sock)
    assert status == 401 and headers["connection"] == "close"


@pytest.mark.parametrize(
    ("path", "method", "allow"),
    [
        ("/get", "POST", "GET, DELETE"),
        ("/get", "PATCH", "GET, DELETE"),
        ("/get", "PUT", "GET, DELETE"),
    ],
)
def test_405_answers_name_the_allowed_methods(
    server: int, path: str, method: str, allow: str
) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{{}}".encode()
        )
        status, headers, payload = read_response(sock)
    assert status == 405
    assert headers["allow"] == allow
    body = json.loads(payload)
    assert body["reason"] == "method_not_allowed" and allow in body["message"]


# ---- the schema check skipped for bodies a model took unchanged ------------------------------


class _Body:
    """Stands in for a handler: body_as reads only ``self.request.body``."""

    def __init__(self, body: Any) -> None:
        self.request = type("R", (), {"body": json.dumps(body).encode()})()


def _heartbeat(**gpu: Any) -> dict[str, Any]:
    return {
        "cpu_milli": 8000,
        "memory_mib": 1024,
        "gpu_probe": {"kind": "virtual", "enabled": True},
        "gpus": [{"index": 0, "uuid": "GPU-0", "model": "V100", "memory_total_mib": 1, **gpu}],
    }


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        (_heartbeat(), True),
        (_heartbeat(utilization_pct=None, nvlink_peers=[1]), True),
        (_heartbeat(memory_total_mib=16384.0), True),  # 16384.0 is an integer to the schema
        (_heartbeat(index="0"), False),  # the model would read "0" as 0; the document not
        (_heartbeat(index=True), False),  # nor true as 1
        ({**_heartbeat(), "gpu_probe": {"kind": "virtual", "enabled": 1}}, False),  # 1 as true
        ({**_heartbeat(), "cpu_milli": "8000"}, False),
        ({**_heartbeat(), "labels": {"rack": 7}}, False),
    ],
)
def test_a_heartbeat_is_refused_or_taken_alike_with_and_without_the_schema_pass(
    body: dict[str, Any], ok: bool
) -> None:
    from nsml_server.schemas import Heartbeat

    for fast in (False, True):
        try:
            APIHandler.body_as(_Body(body), Heartbeat, schema_if_converted=fast)  # type: ignore[arg-type]
            taken = True
        except APIError as e:
            assert e.status_code == 400
            taken = False
        assert taken is ok, (fast, body)
