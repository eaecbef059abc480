"""The API's base handler: HubAuth token check, JSON bodies, JSON errors.

Every error leaves as ``{"message": ..., "reason": ...}`` with the right status; a traceback
only ever reaches the operator's log.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from tornado import web
from tornado.httpclient import HTTPClientError

from ..db import Database
from ..images import DEFAULT_IMAGE

log = logging.getLogger("nsml_server.api")

M = TypeVar("M", bound=BaseModel)


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


class APIHandler(web.RequestHandler):
    """Base of every ``/api/`` handler."""

    auth_required = True

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

    def body_as(self, model: type[M]) -> M:
        """Parse the JSON body into *model*; a 400 that names each bad field otherwise."""
        raw = self.request.body or b""
        if not raw.strip():
            raise APIError(400, "The request needs a JSON body.", "bad_request")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"The request body is not valid JSON: {e}", "bad_request") from e
        if not isinstance(data, dict):
            raise APIError(
                400,
                f"The request body must be a JSON object, not {type(data).__name__}.",
                "bad_request",
            )
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise APIError(400, describe_validation_error(e), "bad_request") from e

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        if isinstance(obj, BaseModel):
            self.finish(obj.model_dump_json())
        else:
            self.finish(json.dumps(obj))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
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


def describe_validation_error(e: ValidationError) -> str:
    """One line per bad field, e.g. ``state: Input should be 'up', 'draining' or 'down'``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "Invalid request: " + "; ".join(parts)
