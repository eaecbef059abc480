"""The sidebar's server extension in a real notebook server: ``/user/NAME/nsml/api/*`` and
``/user/NAME/nsml/stream`` against a real hub, the real NSML service and Docker containers.

What the service receives is observed, not assumed: this module's hub gives notebook servers
the address of a *recorder* (``NSML_API_URL_FOR_SERVERS``), a loopback HTTP proxy in the test
process that passes every request on to the service unchanged and writes down the method,
path and headers it got from the notebook server. Production code is the same as always:
only the address the spawner hands to the servers differs.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer

from tests.hub_fixtures import (
    proxy_available,
    remove_deployment,
    stop_all_servers,
    unique_prefix,
)
from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess, free_port
from tests.integration.test_sessions import FAIL_PY, cli_for

pytestmark = [pytest.mark.hub, pytest.mark.docker]

HOP = {"host", "content-length", "transfer-encoding", "connection"}


@dataclass
class Recorder:
    """A recording loopback proxy in front of the NSML service (its own thread and loop)."""

    target: str
    port: int = field(default_factory=free_port)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> None:
        ready = threading.Event()

        def main() -> None:
            async def serve() -> None:
                app = web.Application([(r".*", RecordingHandler, {"rec": self})])
                self.server = HTTPServer(app)
                self.server.listen(self.port, "127.0.0.1")
                self.loop = asyncio.get_running_loop()
                self.stopped = asyncio.Event()
                ready.set()
                await self.stopped.wait()
                self.server.stop()

            asyncio.run(serve())

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert ready.wait(30), "the recorder did not start"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(30)

    def to(self, path_part: str) -> list[dict[str, Any]]:
        return [r for r in list(self.seen) if path_part in r["path"]]


class RecordingHandler(web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

    def initialize(self, rec: Recorder) -> None:
        self.rec = rec

    async def _pass(self) -> None:
        method = self.request.method or "GET"
        self.rec.seen.append(
            {
                "method": method,
                "path": self.request.path,
                "headers": {k.lower(): v for k, v in self.request.headers.get_all()},
            }
        )
        headers = {k: v for k, v in self.request.headers.get_all() if k.lower() not in HOP}
        streaming = self.request.path.endswith("/events/stream")

        flushes: list[asyncio.Future[None]] = []

        def chunk(data: bytes) -> None:
            self.write(data)
            flushes.append(self.flush())

        def header(line: str) -> None:
            if line.startswith("HTTP/"):
                self.set_status(int(line.split()[1]))
            elif ":" in line and streaming:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-type":
                    self.set_header("Content-Type", v.strip())

        req = HTTPRequest(
            self.rec.target + self.request.uri,
            method=method,
            headers=headers,
            body=self.request.body if method in ("POST", "PUT", "PATCH") else None,
            allow_nonstandard_methods=True,
            follow_redirects=False,
            request_timeout=600 if streaming else 120,
            streaming_callback=chunk if streaming else None,
            header_callback=header if streaming else None,
        )
        resp = await AsyncHTTPClient().fetch(req, raise_error=False)
        if streaming:
            return
        self.set_status(resp.code)
        for k, v in resp.headers.get_all():
            if k.lower() not in HOP:
                self.set_header(k, v)
        if resp.body:
            self.write(resp.body)

    get = post = put = patch = delete = _pass  # type: ignore[assignment]


@pytest.fixture(scope="module")
def lab_hub(docker_client: Any, singleuser_image: str) -> Iterator[tuple[HubProcess, Recorder]]:
    """A hub whose notebook servers reach the service through the recorder."""
    from tests.conftest import service_missing

    if proxy_available() is None:
        service_missing("hub", "configurable-http-proxy is not installed")
    state = Path(tempfile.mkdtemp(prefix="nsml-lab-hub-"))
    prefix = unique_prefix("nsmllab")
    service_port = free_port()
    rec = Recorder(f"http://127.0.0.1:{service_port}")
    rec.start()
    h = HubProcess(
        state,
        env_overrides={
            "NSML_CONTAINER_PREFIX": prefix,
            "NSML_NOTEBOOK_IMAGE": singleuser_image,
            "NSML_API_URL_FOR_SERVERS": f"http://127.0.0.1:{rec.port}/services/nsml/api/",
        },
    )
    h.service_port = service_port
    try:
        h.start()
        yield h, rec
    finally:
        stop_all_servers(h)
        h.stop()
        rec.stop()
        remove_deployment(docker_client, prefix)
        shutil.rmtree(state, ignore_errors=True)


def start_server(hub: HubProcess, name: str) -> None:
    if hub.admin("GET", f"/users/{name}").status_code == 404:
        hub.admin("POST", f"/users/{name}").raise_for_status()
    r = hub.admin("POST", f"/users/{name}/server", json={"user_options": {"gpus": 0}})
    assert r.status_code in (201, 202), r.text
    wait_for(
        lambda: hub.admin("GET", f"/users/{name}").json()["servers"].get("", {}).get("ready"),
        timeout=120,
        what=f"{name}'s notebook server ready",
    )


@pytest.fixture(scope="module")
def ann(lab_hub: tuple[HubProcess, Recorder]) -> Iterator[str]:
    """User fw-ann with a running notebook server."""
    hub, _ = lab_hub
    start_server(hub, "fw-ann")
    yield "fw-ann"
    hub.admin("DELETE", "/users/fw-ann/server")


def browser(hub: HubProcess, name: str) -> tuple[requests.Session, str]:
    """A logged-in cookie session that has opened the user's Lab page, and its _xsrf."""
    s = hub.login(name)
    page = s.get(f"{hub.url}/user/{name}/lab", timeout=120)
    assert page.status_code == 200, page.status_code
    xsrf = s.cookies.get("_xsrf", path=f"/user/{name}/")
    assert xsrf
    return s, str(xsrf)


def assert_json(r: requests.Response | Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict) and body.get("message"), body
    return body


def test_the_browser_calls_the_api_through_its_server_with_the_servers_token_never_its_cookies(
    lab_hub: tuple[HubProcess, Recorder], ann: str
) -> None:
    hub, rec = lab_hub
    s, xsrf = browser(hub, ann)
    s.cookies.set("secret-cookie", "never-forward-me", path="/")
    api = f"{hub.url}/user/{ann}/nsml/api"
    before = len(rec.seen)
    r = s.get(f"{api}/me", headers={"X-XSRFToken": xsrf}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["name"] == ann
    calls = [c for c in rec.seen[before:] if c["path"].endswith("/services/nsml/api/me")]
    assert len(calls) == 1, rec.seen[before:]
    sent = calls[0]["headers"]
    assert "cookie" not in sent, sent
    assert sent["authorization"].startswith("token ") and "never-forward-me" not in str(sent)
    # A write needs the server's XSRF token (jupyter-server's rule for cookie logins).
    r = s.post(f"{api}/sessions", json={}, timeout=60)
    assert_json(r, 403)
    r = s.post(f"{api}/sessions", json={}, headers={"X-XSRFToken": xsrf}, timeout=60)
    body = assert_json(r, 400)  # the service's own refusal of the empty body, passed through
    assert body["reason"] == "bad_request"
    posted = [
        c
        for c in rec.seen[before:]
        if c["method"] == "POST" and c["path"] == "/services/nsml/api/sessions"
    ]
    assert len(posted) == 1 and "cookie" not in posted[0]["headers"], posted
    assert "x-xsrftoken" not in posted[0]["headers"]


def test_errors_of_the_service_arrive_as_json_with_their_status(
    lab_hub: tuple[HubProcess, Recorder], ann: str
) -> None:
    hub, _ = lab_hub
    token = hub.user_token(ann)
    api = f"{hub.url}/user/{ann}/nsml/api"
    auth = {"Authorization": f"token {token}"}
    body = assert_json(requests.get(f"{api}/sessions/{ann}/_/999", headers=auth, timeout=60), 404)
    assert body["reason"] == "not_found" and "No session" in body["message"]
    body = assert_json(requests.get(f"{api}/no-such-endpoint", headers=auth, timeout=60), 404)
    assert "openapi.json" in body["message"]
    body = assert_json(requests.get(f"{api}/events?since=x", headers=auth, timeout=60), 400)
    assert "since" in body["message"]


def server_url(docker_client: Any, hub: HubProcess, name: str) -> str:
    """The notebook server's own address (``http://127.0.0.1:PORT/user/NAME/``), from the
    environment the spawner gave its container."""
    prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"]
    [c] = [
        c
        for c in docker_client.containers.list(filters={"label": f"nsml.user={name}"})
        if c.name.startswith(prefix)
    ]
    env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
    return str(env["JUPYTERHUB_SERVICE_URL"])


def raw_get(base: str, path: str, token: str) -> tuple[int, str, str]:
    """GET *path* on *base*'s host exactly as written (no client resolves its dot segments)."""
    host = base.removeprefix("http://").split("/", 1)[0]
    conn = http.client.HTTPConnection(host, timeout=60)
    try:
        conn.request("GET", path, headers={"Authorization": f"token {token}"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "path",
    [
        "../../../hub/api/users",
        "sessions/../../../api/contents",
        "%2e%2e/%2e%2e/%2e%2e/hub/api/users",
        "sessions/%2E%2E/%2E%2E/%2E%2E/hub/api/users",
        "%2f%2fevil.example.org/api",
        "/evil.example.org/api",
        "http://evil.example.org/api",
        "sessions%2f..%2f..%2fhub",
        "..%5c..%5chub",
    ],
)
def test_paths_outside_the_api_are_refused_and_never_reach_the_service(
    lab_hub: tuple[HubProcess, Recorder], ann: str, path: str, docker_client: Any
) -> None:
    hub, rec = lab_hub
    token = hub.user_token(ann)
    before = len(rec.seen)
    # The notebook server itself, as it receives a path:
    server = server_url(docker_client, hub, ann)
    status, ctype, text = raw_get(server, f"/user/{ann}/nsml/api/{path}", token)
    assert status == 400, (status, text[:300])
    assert ctype.startswith("application/json") and json.loads(text)["reason"] == "bad_path"
    # Through the hub's proxy, which resolves dot segments itself (encoded ones too, as URLs
    # do): the request then reaches another route (the hub's, or ann's own server's API with
    # ann's own token), never the NSML service.
    raw_get(hub.url, f"/user/{ann}/nsml/api/{path}", token)
    leaked = [c for c in rec.seen[before:] if "/hub" in c["path"] or "evil" in c["path"]]
    assert leaked == [] and [c for c in rec.seen[before:] if "contents" in c["path"]] == []


def test_another_users_browser_or_token_cannot_use_my_server_to_reach_my_sessions(
    lab_hub: tuple[HubProcess, Recorder], ann: str
) -> None:
    hub, rec = lab_hub
    before = len(rec.seen)
    bob_token = hub.user_token("fw-bob")
    api = f"{hub.url}/user/{ann}/nsml/api"
    r = requests.get(f"{api}/sessions", headers={"Authorization": f"token {bob_token}"}, timeout=60)
    assert r.status_code in (403, 404), (r.status_code, r.text[:300])
    r = requests.get(
        f"{hub.url}/user/{ann}/nsml/stream",
        headers={"Authorization": f"token {bob_token}"},
        timeout=60,
    )
    assert r.status_code in (403, 404), (r.status_code, r.text[:300])
    bob = hub.login("fw-bob")
    r = bob.get(f"{api}/sessions", timeout=60, allow_redirects=True)
    answered = r.status_code == 200 and r.headers.get("Content-Type", "").startswith(
        "application/json"
    )
    assert not answered, (r.status_code, r.text[:300])
    forwarded = [c for c in rec.seen[before:] if c["path"].startswith("/services/nsml/api/sess")]
    assert forwarded == [], "nothing reached the service through ann's server"


class EventReader:
    """The events (``{"event", "id", "data"}``) of an open stream, read through one line
    iterator for the stream's whole life (a second iterator would lose what the first had
    buffered)."""

    def __init__(self, resp: requests.Response) -> None:
        self.resp = resp
        self.lines = resp.iter_lines(decode_unicode=True)
        self.got: list[dict[str, Any]] = []

    def until(self, want: Any, limit_s: float = 180) -> list[dict[str, Any]]:
        """Read until *want* (a predicate on all events so far) holds; heartbeats keep the
        read going; *limit_s* only ends a broken run."""
        if want(self.got):
            return self.got
        cur: dict[str, Any] = {}
        deadline = time.monotonic() + limit_s
        for raw in self.lines:
            line = raw or ""
            if line.startswith("id: "):
                cur["id"] = line[4:]
            elif line.startswith("event: "):
                cur["event"] = line[7:]
            elif line.startswith("data: "):
                cur["data"] = json.loads(line[6:])
            elif line == "" and cur:
                self.got.append(cur)
                cur = {}
                if want(self.got):
                    return self.got
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"the stream ended or stalled before the wanted event: {self.got}")


def connected(got: list[dict[str, Any]]) -> bool:
    return any(e.get("event") == "status" and e["data"]["connected"] for e in got)


def test_a_sessions_state_change_reaches_every_tab_through_one_upstream_stream(
    lab_hub: tuple[HubProcess, Recorder], ann: str, tmp_path: Path
) -> None:
    hub, rec = lab_hub
    token = hub.user_token(ann)
    auth = {"Authorization": f"token {token}"}
    streams_before = len(rec.to("/events/stream"))
    tabs = [
        requests.get(
            f"{hub.url}/user/{ann}/nsml/stream", headers=auth, stream=True, timeout=(30, 60)
        )
        for _ in range(2)
    ]
    try:
        for t in tabs:
            assert t.status_code == 200, t.text[:300]
            assert t.headers["Content-Type"].startswith("text/event-stream")
        readers = [EventReader(t) for t in tabs]
        # both tabs are connected once the server's upstream stream is
        for reader in readers:
            reader.until(connected)
        (tmp_path / "fail.py").write_text(FAIL_PY)
        nsml = cli_for(hub, token, tmp_path)
        name = nsml("run", "fail.py").stdout.strip()

        def ended(got: list[dict[str, Any]]) -> bool:
            return any(
                e.get("event") == "session"
                and e["data"]["session"] == name
                and e["data"]["state"] == "failed"
                for e in got
            )

        for reader in readers:
            got = reader.until(ended)
            mine = [e for e in got if e.get("event") == "session" and e["data"]["session"] == name]
            now = mine[-1]["data"]["now"]
            assert now["state"] == "failed" and now["exit_code"] == 1, mine[-1]
            assert all(int(e["id"]) > 0 for e in mine)
        upstream = rec.to("/events/stream")[streams_before:]
        assert len(upstream) == 1, f"one upstream connection for both tabs, got {upstream}"
        assert "cookie" not in upstream[0]["headers"]
    finally:
        for t in tabs:
            t.close()
    # A tab that reconnects with its last id gets what it missed from the server's buffer.
    r = requests.get(
        f"{hub.url}/user/{ann}/nsml/stream",
        headers={**auth, "Last-Event-ID": "1"},
        stream=True,
        timeout=(30, 60),
    )
    try:
        got = EventReader(r).until(lambda got: any(e.get("event") == "session" for e in got))
        assert all(int(e["id"]) > 1 for e in got if e.get("event") == "session" and "id" in e)
    finally:
        r.close()
