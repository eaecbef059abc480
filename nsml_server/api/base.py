"""The API's base handler: HubAuth token check, parameter rules, JSON bodies, JSON errors.

Every error leaves as ``{"message": ..., "reason": ...}`` with the right status; a traceback
only ever reaches the operator's log. What every route gets from here, before its handler
runs:

- its path and query parameters checked against the OpenAPI document's rules
  (:mod:`nsml_server.api.routes`);
- a JSON body nested deeper than :data:`MAX_JSON_DEPTH` refused with a 400 (a parser would
  otherwise recurse until it fails);
- a refusal decided before a streamed body was read (a refused upload) still reaches the
  client: the rest of the body is read and dropped first (up to :data:`LINGER_MAX_BYTES` and
  :data:`LINGER_TIMEOUT_S`), instead of closing the connection under a client that is still
  sending (the hub's proxy in front then answers 503);
- a 405 names the allowed methods in an ``Allow`` header.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import jsonschema
from pydantic import BaseModel, ValidationError
from tornado import httputil, web
from tornado.http1connection import HTTP1Connection
from tornado.httpclient import HTTPClientError

from ..db import Database
from ..images import DEFAULT_IMAGE
from .routes import ParamError, RouteRules, decode_query, implemented_methods

log = logging.getLogger("nsml_server.api")

M = TypeVar("M", bound=BaseModel)

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a JSON body (requests nest 4 or 5 deep)."""

LINGER_MAX_BYTES = 256 << 20
"""Most bytes of a refused request's body read (and dropped) before the answer. A larger
body gets the answer at once with ``Connection: close``; a client that keeps sending then may
see the connection reset (send ``Expect: 100-continue`` to be refused before sending)."""

LINGER_TIMEOUT_S = 30.0
"""Most seconds spent reading a refused request's body before the answer."""

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text *raw* nests arrays and objects deeper than *limit* levels.

    Works on the text, without parsing it (parsing is what recurses): strings are removed,
    then innermost ``[]`` / ``{}`` pairs, one level per pass. Brackets that are left after
    *limit* passes are deeper than *limit*, or do not match; the latter also counts when
    so many are left that a parser would recurse that deep before it noticed.
    """
    skeleton = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not skeleton:
            return False
        skeleton, n = _INNERMOST.subn(b"", skeleton)
        if n == 0:
            break
    return len(skeleton) > limit or (bool(skeleton) and _INNERMOST.search(skeleton) is not None)


def parse_json(raw: bytes | str, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses nesting deeper than *limit* with a 400 (never a 500)."""
    data = raw.encode() if isinstance(raw, str) else raw
    if json_too_deep(data, limit):
        raise APIError(400, _too_deep(limit), "bad_request")
    try:
        return json.loads(data)
    except RecursionError:
        raise APIError(400, _too_deep(limit), "bad_request") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", "bad_request") from e


def _too_deep(limit: int) -> str:
    return (
        f"The request body nests arrays and objects more than {limit} levels deep (or its "
        "brackets do not match); send a flatter document."
    )


class APIError(web.HTTPError):
    """An error for the API's caller: a status, a sentence saying what to do, a stable reason."""

    def __init__(self, status_code: int, message: str, reason: str) -> None:
        super().__init__(status_code, log_message=message.replace("%", "%%"))
        self.message = message
        self.error_reason = reason


@dataclass
class ServerContext:
    """What handlers share: the database, the hub auth client, the clock and server facts."""

    db: Database
    hub_auth: Any
    version: str
    schema_revision: str
    now: Callable[[], datetime]
    backend: dict[str, Any] = field(default_factory=dict)
    is_leader: Callable[[], bool] = lambda: True
    default_credits_milli: int = 0
    scheduler: Any = None
    submit_queue: Any = None  # scheduler.SubmitQueue: placement submissions, group-committed
    trusted_services: frozenset[str] = frozenset({"nsml-spawner"})
    datasets: Any = None
    allowed_images: tuple[str, ...] = (DEFAULT_IMAGE,)  # NSMLServer.allowed_images (patterns)
    gpu_use: Any = None  # gpu_use.GpuUseMonitor: sessions' GPU use over time
    heartbeats: Any = None  # batching.HeartbeatQueue: heartbeats, group-committed off the loop
    deployment: str = ""  # the container label of this deployment (session_runner)


class APIHandler(web.RequestHandler):
    """Base of every ``/api/`` handler."""

    auth_required = True

    route: RouteRules | None = None
    """The parameter rules of the route this handler answers (see :mod:`.routes`)."""

    def __init__(
        self, application: web.Application, request: httputil.HTTPServerRequest, **kwargs: Any
    ) -> None:
        self.route = kwargs.pop("route", None)
        super().__init__(application, request, **kwargs)

    def initialize(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.hub_user: dict[str, Any] | None = None

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def check_xsrf_cookie(self) -> None:
        """Token-authenticated API: no cookies are accepted, so no XSRF check applies."""

    async def prepare(self) -> None:
        if self.auth_required:
            await self.authenticate()
        self.check_params()
        self.check_json_body()

    def check_params(self) -> None:
        """Refuse a path or query parameter that breaks the document's rule for it."""
        if self.route is None or self.request.method is None:
            return
        try:
            self.route.check(
                self.request.method, self.path_args, decode_query(self.request.query_arguments)
            )
        except ParamError as e:
            raise APIError(
                e.status, e.message, "not_found" if e.status == 404 else "bad_request"
            ) from None

    def check_json_body(self) -> None:
        """Refuse a JSON body nested too deep, before any handler parses it."""
        if web._has_stream_request_body(type(self)):
            return
        body = self.request.body
        if body and body.lstrip()[:1] in (b"{", b"[") and json_too_deep(body):
            raise APIError(400, _too_deep(MAX_JSON_DEPTH), "bad_request")

    async def authenticate(self) -> None:
        hub_auth = self.ctx.hub_auth
        try:
            user = await hub_auth.get_user(self, sync=False)
        except (HTTPClientError, ConnectionError, OSError) as e:
            log.error("cannot reach the JupyterHub API to check a token: %s", e)
            raise APIError(
                503,
                "The hub could not be reached to check your token; try again in a moment.",
                "hub_unavailable",
            ) from e
        except web.HTTPError as e:
            if e.status_code >= 500:
                log.error("hub token check failed: %s", e)
                raise APIError(
                    503,
                    "The hub could not check your token; try again in a moment.",
                    "hub_unavailable",
                ) from e
            user = None
        if not user:
            raise APIError(
                401,
                "Missing or invalid token. Send 'Authorization: token <JupyterHub API token>' "
                "(create one at /hub/token, or set NSML_TOKEN for the nsml client).",
                "unauthenticated",
            )
        required = hub_auth.access_scopes
        if required and not hub_auth.check_scopes(required, user):
            raise APIError(
                403,
                f"Your token lacks the scope {' or '.join(sorted(required))}. "
                "Create a new token (at /hub/token) with that scope.",
                "forbidden",
            )
        self.hub_user = user

    @property
    def user_name(self) -> str:
        assert self.hub_user is not None
        return str(self.hub_user["name"])

    @property
    def is_service(self) -> bool:
        return bool(self.hub_user and self.hub_user.get("kind") == "service")

    @property
    def is_admin(self) -> bool:
        """A hub admin, or a trusted service (the hub's spawner) acting for users."""
        if not self.hub_user:
            return False
        if self.is_service:
            return str(self.hub_user.get("name")) in self.ctx.trusted_services
        return bool(self.hub_user.get("admin"))

    def require_admin(self) -> None:
        if not self.is_admin:
            raise APIError(403, "This needs a hub admin.", "forbidden")

    def body_as(self, model: type[M], *, schema_if_converted: bool = False) -> M:
        """Parse the JSON body into *model*; a 400 that names each bad field otherwise.

        *schema_if_converted*: check the body against the JSON schema only when the model
        did not take it exactly as sent (its JSON text differs from the body's), for models
        whose schema states no rule the model does not enforce itself. The schema check
        costs ~3 ms for a heartbeat, a thousand nodes send ~100 a second.
        """
        raw = self.request.body or b""
        if not raw.strip():
            raise APIError(400, "The request needs a JSON body.", "bad_request")
        data = parse_json(raw)
        if not isinstance(data, dict):
            raise APIError(
                400,
                f"The request body must be a JSON object, not {type(data).__name__}.",
                "bad_request",
            )
        try:
            parsed = model.model_validate(data)
        except ValidationError as e:
            raise APIError(400, describe_validation_error(e), "bad_request") from e
        if schema_if_converted and _same_json(parsed.model_dump(exclude_unset=True), data):
            return parsed  # nothing was converted: the body is what the document allows
        # The model converts what the document does not allow (``false`` as 0, "3" as 3).
        problems = schema_problems(model, data)
        if problems:
            raise APIError(400, "Invalid request: " + "; ".join(problems), "bad_request")
        return parsed

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        if isinstance(obj, BaseModel):
            self.finish(obj.model_dump_json())
        else:
            self.finish(json.dumps(obj))

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ValidationError):
            status_code = 400
        super().send_error(status_code, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ValidationError):
            exc = APIError(400, describe_validation_error(exc), "bad_request")
        if status_code == 405:
            allowed = implemented_methods(type(self))
            self.set_header("Allow", ", ".join(allowed))
            if not isinstance(exc, APIError):
                exc = APIError(
                    405,
                    f"{self.request.method} is not allowed on {self.request.path}; "
                    f"allowed: {', '.join(allowed) or 'none'}.",
                    "method_not_allowed",
                )
        if isinstance(exc, APIError):
            message, reason = exc.message, exc.error_reason
        elif isinstance(exc, web.HTTPError):
            message = exc.log_message % exc.args if exc.log_message else self._reason
            reason = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
                status_code, "error"
            )
        else:
            incident = uuid.uuid4().hex[:12]
            log.error("incident %s on %s %s", incident, self.request.method, self.request.path)
            message = f"Internal error (incident {incident}); the operator's log has details."
            reason = "internal_error"
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"message": message, "reason": reason}))

    # ---- answering before the body has arrived ---------------------------------------------

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> asyncio.Future[None]:
        """Finish the answer; when a streamed body is still arriving, first read the rest.

        A streamed upload may be refused before its body is read (a bad token, a size over
        the limit). Tornado would then end the connection under a client that is still
        sending, and the hub's proxy, still forwarding that body, resets the client's
        connection: "503 socket hang up", or a reset on the client's next request. Answering
        while the body still arrives does not help either (the proxy gives up on a request
        whose answer came first). So the rest of the body is read and dropped, within
        :data:`LINGER_MAX_BYTES` and :data:`LINGER_TIMEOUT_S`, and the answer follows on a
        connection that stays usable. Past either bound, or when the client waits for
        ``100 Continue``, the answer goes at once with ``Connection: close``.
        """
        body_future = getattr(self.request, "_body_future", None)
        if self._finished or body_future is None or body_future.done():
            return super().finish(chunk)
        headers = self.request.headers
        try:
            length = int(headers.get("Content-Length", "0"))
        except ValueError:
            length = LINGER_MAX_BYTES + 1
        if headers.get("Expect", "").lower() == "100-continue" or length > LINGER_MAX_BYTES:
            self.set_header("Connection", "close")
            return super().finish(chunk)
        conn = self.request.connection
        if isinstance(conn, HTTP1Connection):
            conn.set_max_body_size(1 << 62)  # what arrives is counted (and bounded) below
        self._dropped = 0
        self._too_much = asyncio.Event()
        self.data_received = self._drop  # type: ignore[method-assign]
        # The answer is decided: nothing else may write it, nor run the handler's method.
        self._finished = True
        return asyncio.ensure_future(self._finish_after_body(body_future, chunk))

    def _drop(self, chunk: bytes) -> None:
        self._dropped += len(chunk)
        if self._dropped > LINGER_MAX_BYTES:
            self._too_much.set()

    async def _finish_after_body(
        self, body_future: asyncio.Future[None], chunk: str | bytes | dict[str, Any] | None
    ) -> None:
        arrived: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(body_future))
        too_much: asyncio.Future[Any] = asyncio.ensure_future(self._too_much.wait())
        try:
            await asyncio.wait(
                [arrived, too_much],
                timeout=LINGER_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            too_much.cancel()
        if arrived.done() and arrived.exception() is not None:  # the client went away
            self.on_finish()
            return
        if not arrived.done():
            arrived.cancel()
            log.info(
                "%s %s: the rest of a refused body did not arrive (%d bytes in %.0fs); closing",
                self.request.method,
                self.request.path,
                self._dropped,
                LINGER_TIMEOUT_S,
            )
            self.set_header("Connection", "close")
        self._finished = False
        await super().finish(chunk)


class NotFoundHandler(APIHandler):
    """Anything under the API prefix that matches no route."""

    auth_required = False

    def prepare(self) -> None:  # type: ignore[override]
        raise APIError(
            404,
            f"No API endpoint {self.request.method} {self.request.path}; "
            "see api/openapi.json for the list.",
            "not_found",
        )


@functools.cache
def _validator(model: type[BaseModel]) -> jsonschema.protocols.Validator:
    schema = model.model_json_schema(mode="validation")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON text (``1`` is not ``true``, nor ``1.0``, unlike Python's ``==``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def schema_problems(model: type[BaseModel], data: Any, most: int = 5) -> list[str]:
    """Where *data* breaks the JSON schema of *model* (the one the OpenAPI document shows),
    one ``field: problem`` line each, at most *most*."""
    problems = []
    for err in sorted(_validator(model).iter_errors(data), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in err.absolute_path) or "body"
        message = err.message if len(err.message) <= 200 else err.message[:197] + "..."
        problems.append(f"{where}: {message}")
        if len(problems) >= most:
            break
    return problems


def describe_validation_error(e: ValidationError) -> str:
    """One line per bad field, e.g. ``state: Input should be 'up', 'draining' or 'down'``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif isinstance(err.get("input"), str | int | float) and err["type"] != "missing":
            shown = repr(err["input"])
            msg += f", not {shown if len(shown) <= 60 else shown[:57] + '...'}"
        parts.append(f"{loc}: {msg}")
    return "Invalid request: " + "; ".join(parts)
