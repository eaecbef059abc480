"""The notebook server's ``nsml/`` routes: the API forwarder and the shared event stream.

Both are behind the notebook server's own login (``@tornado.web.authenticated``; a hub user
who may not use this server is refused before anything is forwarded) and jupyter-server's
XSRF check for every method but GET. What goes to the service:

- the method, the API path (checked by :func:`.target.api_target`) and the query;
- the body, and only the headers in :data:`FORWARD_HEADERS`: never the browser's
  ``Cookie`` or ``Authorization``; the request carries the notebook server's own hub token
  instead;

What comes back: the service's status, body and the headers in :data:`RETURN_HEADERS`. An
error the forwarder answers itself is JSON ``{"message", "reason"}``: 400/404 for a path
outside the API, 502 when the service cannot be reached or answers something that is not its
API (the hub's proxy's HTML page when the service is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from traitlets import Float, Int, Unicode
from traitlets.config import Configurable

from .stream import FanOut, Listener, frame, http_connect
from .target import Service, TargetError, api_target, service_from_env, service_from_hub_model

FORWARD_HEADERS = (
    "Accept",
    "Content-Type",
    "If-None-Match",
    "If-Match",
    "X-Checkpoint-SHA256",
)
"""Request headers passed to the service (an allow-list: nothing else, cookies least)."""

RETURN_HEADERS = (
    "Content-Type",
    "Content-Disposition",
    "ETag",
    "Allow",
    "Retry-After",
    "X-Checkpoint-SHA256",
)
"""Answer headers passed back to the browser (never ``Set-Cookie``)."""


class NSMLForwarder(Configurable):
    """How the notebook server reaches the NSML service (``c.NSMLForwarder.*``)."""

    api_url = Unicode(
        "",
        config=True,
        help="""The NSML API, e.g. http://127.0.0.1:8090/services/nsml/api/. Default: '' =
        $NSML_API_URL (the spawner sets the service's direct address), else derived from
        $JUPYTERHUB_PUBLIC_HUB_URL, else asked from the hub API ($JUPYTERHUB_API_URL).""",
    )
    request_timeout_s = Float(
        300.0,
        config=True,
        help="""Seconds a forwarded request may take in all (an upload of a large body
        included); past it the browser gets a 502 JSON answer.""",
    )
    max_body_bytes = Int(
        256 * 1024 * 1024,
        config=True,
        help="""Largest answer body, in bytes, forwarded (answers are read whole before they
        are passed on); a larger one is a 502. Large downloads should use the nsml client.""",
    )
    heartbeat_s = Float(
        15.0,
        config=True,
        help="""Seconds of quiet after which a browser's event stream gets a comment line (so
        proxies keep it open and the browser notices a dead one).""",
    )
    linger_s = Float(
        30.0,
        config=True,
        help="""Seconds the upstream event stream stays open after the last browser left (a
        page reload reuses it).""",
    )
    buffer_max = Int(
        1000,
        config=True,
        help="""Events kept for browsers that reconnect with Last-Event-ID; one that missed
        more gets a 'reset' event (reload what it shows).""",
    )

    _service: Service | None = None
    _fanout: FanOut | None = None

    async def service(self) -> Service:
        """The API and the token; raises :class:`TargetError` (502) when unknown."""
        if self._service is not None:
            return self._service
        found = service_from_env(os.environ, self.api_url)
        if found is None:
            found = await self._ask_hub()
        if found is None:
            raise TargetError(
                502,
                "This notebook server does not know where the NSML service is: it needs "
                "JUPYTERHUB_API_TOKEN and NSML_API_URL (or c.NSMLForwarder.api_url).",
                "service_unknown",
            )
        self._service = found
        return found

    async def _ask_hub(self) -> Service | None:
        hub, token = os.environ.get("JUPYTERHUB_API_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
        if not hub or not token:
            return None
        try:
            resp = await AsyncHTTPClient().fetch(
                url_path_join(hub, "services", "nsml"),
                headers={"Authorization": f"token {token}"},
                request_timeout=10,
            )
            model = json.loads(resp.body)
        except (HTTPClientError, OSError, ValueError):
            return None
        return service_from_hub_model(model, token) if isinstance(model, dict) else None

    async def fanout(self) -> FanOut:
        """The server's one upstream event stream (made on first use)."""
        if self._fanout is None:
            svc = await self.service()
            self._fanout = FanOut(
                http_connect(svc.api_url + "events/stream", svc.token),
                buffer_max=self.buffer_max,
                linger_s=self.linger_s,
            )
        return self._fanout


class NSMLHandler(APIHandler):
    """Base: JSON errors ``{"message", "reason"}`` from the forwarder itself."""

    def initialize(self, forwarder: NSMLForwarder) -> None:
        self.forwarder = forwarder

    def fail(self, status: int, message: str, reason: str) -> None:
        self.clear()
        self.set_status(status)
        self.finish(json.dumps({"message": message, "reason": reason}))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, TargetError):
            self.fail(exc.status, exc.message, exc.reason)
            return
        if not isinstance(exc, web.HTTPError):
            self.log.error(
                "nsml forwarder: %s %s failed",
                self.request.method,
                self.request.path,
                exc_info=kwargs.get("exc_info"),
            )
            self.fail(
                502,
                "The NSML forwarder could not complete the request; the notebook server's "
                "log has details.",
                "forwarder_error",
            )
            return
        super().write_error(status_code, **kwargs)


class ForwardHandler(NSMLHandler):
    """``{base_url}nsml/api/<path>``: the NSML API, called with this server's token."""

    @web.authenticated
    async def get(self, path: str = "") -> None:
        await self.forward(path)

    @web.authenticated
    async def post(self, path: str = "") -> None:
        await self.forward(path)

    @web.authenticated
    async def put(self, path: str = "") -> None:
        await self.forward(path)

    @web.authenticated
    async def patch(self, path: str = "") -> None:
        await self.forward(path)

    @web.authenticated
    async def delete(self, path: str = "") -> None:
        await self.forward(path)

    def _raw_path(self) -> str:
        """The path after ``nsml/api/`` as it arrived (still percent-encoded)."""
        prefix = url_path_join(self.base_url, "nsml/api/")
        path = self.request.path
        return path[len(prefix) :] if path.startswith(prefix) else ""

    async def forward(self, _path: str) -> None:
        try:
            svc = await self.forwarder.service()
            url = api_target(svc.api_url, self._raw_path(), self.request.query)
        except TargetError as e:
            self.fail(e.status, e.message, e.reason)
            return
        method = self.request.method or "GET"
        headers = {h: self.request.headers[h] for h in FORWARD_HEADERS if h in self.request.headers}
        headers["Authorization"] = f"token {svc.token}"
        body = self.request.body if method in ("POST", "PUT", "PATCH") else None
        req = HTTPRequest(
            url,
            method=method,
            headers=headers,
            body=body if body is not None or method not in ("POST", "PUT", "PATCH") else b"",
            allow_nonstandard_methods=True,
            follow_redirects=False,
            connect_timeout=10,
            request_timeout=self.forwarder.request_timeout_s,
            decompress_response=True,
        )
        client = AsyncHTTPClient(max_body_size=self.forwarder.max_body_bytes)
        try:
            resp = await client.fetch(req, raise_error=False)
        except Exception as e:  # DNS, refused connection, a body over the limit ...
            self.fail(502, f"The NSML service at {svc.api_url} did not answer: {e}", "bad_gateway")
            return
        if resp.code == 599 or (resp.error is not None and resp.code >= 600):
            self.fail(
                502,
                f"The NSML service at {svc.api_url} did not answer: {resp.error}",
                "bad_gateway",
            )
            return
        ctype = resp.headers.get("Content-Type", "")
        if resp.code >= 400 and not ctype.startswith("application/json"):
            self.fail(
                502,
                f"The NSML service did not answer as its API (HTTP {resp.code}, "
                f"{ctype or 'no content type'}); is it running?",
                "bad_gateway",
            )
            return
        self.set_status(resp.code)
        for h in RETURN_HEADERS:
            if h in resp.headers and h != "Content-Type":
                self.set_header(h, resp.headers[h])
        body_out = resp.body or b""
        if resp.code in (204, 304):
            await self.finish(set_content_type=ctype or "application/json")
            return
        await self.finish(body_out, set_content_type=ctype or "application/octet-stream")


class StreamHandler(NSMLHandler):
    """``{base_url}nsml/stream``: the user's NSML events as server-sent events, from the
    server's one upstream connection (:class:`.stream.FanOut`)."""

    _track_activity = False  # an open sidebar is not activity: the server may be culled
    _listener: Listener | None = None

    @web.authenticated
    async def get(self, *_: str) -> None:
        try:
            fanout = await self.forwarder.fanout()
        except TargetError as e:
            self.fail(e.status, e.message, e.reason)
            return
        last = self.request.headers.get("Last-Event-ID") or self.get_argument("since", None)
        self._listener = listener = fanout.subscribe(last)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")
        try:
            self.write("retry: 3000\n: connected\n\n")
            await self.flush()
            while True:
                try:
                    ev = await asyncio.wait_for(listener.get(), self.forwarder.heartbeat_s)
                except TimeoutError:
                    self.write(": heartbeat\n\n")
                    await self.flush()
                    continue
                if ev is None:
                    break
                self.write(frame(ev))
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            fanout.unsubscribe(listener)
        with contextlib.suppress(StreamClosedError):
            await self.finish(set_content_type="text/event-stream; charset=utf-8")

    def on_connection_close(self) -> None:
        if self._listener is not None:
            self._listener.close()  # ends the loop in get(), which unsubscribes


def setup_handlers(server_app: Any) -> None:
    """Add the ``nsml/`` routes to *server_app*'s web application."""
    web_app = server_app.web_app
    base = web_app.settings["base_url"]
    forwarder = NSMLForwarder(parent=server_app)
    kw = {"forwarder": forwarder}
    web_app.settings["nsml_forwarder"] = forwarder
    web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "nsml/stream"), StreamHandler, kw),
            (url_path_join(base, "nsml/api/stream"), StreamHandler, kw),
            (url_path_join(base, "nsml/api/events/stream"), StreamHandler, kw),
            (url_path_join(base, "nsml/api/(.*)"), ForwardHandler, kw),
            (url_path_join(base, "nsml/api"), ForwardHandler, kw),
        ],
    )
