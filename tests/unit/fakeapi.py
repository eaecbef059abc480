"""A stand-in for the NSML API on loopback, for tests of the client's own behaviour.

It answers a few GET routes with canned JSON (``routes``: path -> body or status and body)
and records every request it receives, so that a test can assert that nothing was sent.
Anything not in ``routes`` answers 404 with the API's error shape.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeAPI:
    """``with FakeAPI.running({"me": {...}}) as api:`` → ``api.url`` (ends in ``/api/``)."""

    def __init__(self, routes: dict[str, Any] | None = None) -> None:
        self.routes: dict[str, Any] = dict(routes or {})
        self.requests: list[tuple[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self) -> None:
                path = self.path.split("?", 1)[0]
                api.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                key = path.removeprefix("/api/")
                found = api.routes.get(key)
                status, body = (200, found) if found is not None else (404, None)
                if isinstance(found, tuple):
                    status, body = found
                if body is None:
                    body = {"message": f"no route {path}", "reason": "not_found"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/"

    @classmethod
    @contextmanager
    def running(cls, routes: dict[str, Any] | None = None) -> Iterator[FakeAPI]:
        api = cls(routes)
        thread = threading.Thread(target=api.server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield api
        finally:
            api.server.shutdown()
            api.server.server_close()
            thread.join(5)


def session(n: int, user: str = "alice", state: str = "completed") -> dict[str, Any]:
    """A session as ``GET api/sessions`` lists it."""
    return {
        "name": f"{user}/_/{n}",
        "state": state,
        "resources": {"gpus": 0, "gpu_models": [], "cpu": 1, "memory_mib": 1024},
        "node": "node-a",
        "created": "2026-01-01T00:00:00Z",
        "duration_s": 12.0,
        "last_metrics": {"loss": 0.5},
        "memo": "",
        "message": None,
        "queue": None,
    }


def node(name: str, kind: str, gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """A node as ``GET api/nodes`` lists it, with a probe of *kind* (nvml, virtual, none)."""
    return {
        "name": name,
        "state": "up",
        "backend": "docker",
        "cpu_milli": 8000,
        "memory_mib": 32768,
        "gpu_probe": {"kind": kind, "enabled": kind != "none", "reason": None},
        "gpus": gpus,
    }


def gpu(index: int, util: int | None, used: int = 0, allocated: int = 0) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": f"GPU-{index}",
        "model": "NVIDIA A100" if util is not None else "NVIDIA Virtual GPU",
        "memory_total_mib": 40960,
        "memory_used_mib": used,
        "utilization_pct": util,
        "allocated_milli": allocated,
    }
