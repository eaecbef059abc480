"""The NSML API as the hub's spawner uses it: placements and nodes, async, bounded, retried.

Calls go through tornado's ``AsyncHTTPClient`` (the hub's own event loop) with the token of the
trusted service ``nsml-spawner``, which may place resources on a user's behalf. Transient
failures (no connection, 502/503/504) are retried with jittered exponential backoff; every call
here is idempotent (asking again for the same placement holder returns the same request), so
retrying never allocates twice.

:func:`wait_for_placement` is the queue loop of a spawn: ask, then keep asking (long polls)
until placed, refused, or out of time; time and sleeping are injected so tests can run it
without waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

__all__ = [
    "Infeasible",
    "NSMLClient",
    "NSMLError",
    "NSMLUnavailable",
    "QueueTimeout",
    "asks_the_same",
    "wait_for_placement",
]

log = logging.getLogger("nsml_spawner.client")

_TRANSIENT = {502, 503, 504, 599}


class NSMLError(Exception):
    """The NSML API refused a call.

    Attributes:
        status: the HTTP status (599: no answer).
        message: the API's message for a person.
        reason: the API's stable reason code (e.g. ``infeasible``, ``bad_request``).
    """

    def __init__(self, status: int, message: str, reason: str = "error") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.message = message
        self.reason = reason


class NSMLUnavailable(NSMLError):
    """The NSML API did not answer, or answered that it is briefly unavailable."""


class Infeasible(NSMLError):
    """The request can never fit on this cluster (the API's 422)."""


class QueueTimeout(Exception):
    """No placement within the time allowed; *last* is the last answer (a waiting request)."""

    def __init__(self, last: Mapping[str, Any], waited_s: float) -> None:
        super().__init__(f"still waiting after {waited_s:.0f}s: {last.get('reason')}")
        self.last = dict(last)
        self.waited_s = waited_s


class NSMLClient:
    """A small async client of the NSML REST API.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8090/services/nsml/api/``.
        token: a hub API token with ``access:services!service=nsml``.
        timeout_s: HTTP timeout of a call (a long poll adds its ``wait_s``).
        retries: extra attempts after a transient failure.
        backoff_s: bound of the first retry delay; doubles each retry (at most 8 s), full jitter.
        max_clients: HTTP requests in flight at once (long polls hold one each).
        rng: randomness for the jitter.
        logger: where to log.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 4,
        backoff_s: float = 0.25,
        max_clients: int = 64,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not base_url:
            raise ValueError(
                "the NSML API URL is empty; set c.NSMLSpawner.scheduler_url (default: "
                "$NSML_API_URL_FOR_SERVERS), e.g. http://127.0.0.1:8090/services/nsml/api/"
            )
        self.base_url = base_url.rstrip("/") + "/"
        self._token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._max_clients = max_clients
        self._rng = rng or random.Random()
        self._log = logger or log
        self._http: AsyncHTTPClient | None = None

    @property
    def http(self) -> AsyncHTTPClient:
        """This client's own HTTP client (so its long polls never starve the hub's)."""
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True, max_clients=self._max_clients)
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    async def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> tuple[int, Any]:
        """One API call; returns (status, parsed JSON) for 2xx answers.

        Raises:
            NSMLUnavailable: no answer or 502/503/504 after every retry.
            NSMLError: any other 4xx/5xx answer (:class:`Infeasible` for 422).
        """
        attempts = (self.retries if retries is None else retries) + 1
        url = self.base_url + path.lstrip("/")
        for attempt in range(attempts):
            req = HTTPRequest(
                url,
                method=method,
                headers={
                    "Authorization": f"token {self._token}",
                    "Content-Type": "application/json",
                },
                body=json.dumps(body) if body is not None else None,
                request_timeout=timeout_s or self.timeout_s,
                connect_timeout=10,
            )
            try:
                resp = await self.http.fetch(req, raise_error=False)
                status, text = resp.code, (resp.body or b"").decode("utf-8", "replace")
                error = resp.error if status == 599 else None
            except (HTTPClientError, OSError) as e:
                status, text, error = 599, "", e
            if status < 400:
                return status, json.loads(text) if text else None
            if status in _TRANSIENT:
                what = str(error) if error else f"HTTP {status}"
                if attempt + 1 < attempts:
                    delay = self._rng.uniform(0, min(8.0, self.backoff_s * 2**attempt))
                    self._log.warning(
                        "NSML API %s %s failed (%s); retry %d/%d in %.2fs",
                        method,
                        path,
                        what,
                        attempt + 1,
                        attempts - 1,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                raise NSMLUnavailable(
                    status,
                    f"the NSML API at {self.base_url} did not answer ({what})",
                    "unavailable",
                )
            message, reason = _error_body(text, status)
            if status == 422:
                raise Infeasible(status, message, reason)
            raise NSMLError(status, message, reason)
        raise AssertionError("unreachable")  # pragma: no cover

    async def place(self, body: Mapping[str, Any], wait_s: float) -> tuple[int, dict[str, Any]]:
        """``POST placements`` waiting up to *wait_s* for a decision: (status, placement)."""
        status, out = await self.call(
            "POST", "placements", {**body, "wait_s": wait_s}, timeout_s=self.timeout_s + wait_s
        )
        return status, dict(out)

    async def placement(self, pid: int) -> dict[str, Any]:
        """``GET placements/ID``."""
        return dict((await self.call("GET", f"placements/{int(pid)}"))[1])

    async def release(self, pid: int, *, retries: int | None = None) -> dict[str, Any] | None:
        """``DELETE placements/ID``: cancel or release; idempotent. None when it is unknown."""
        try:
            return dict((await self.call("DELETE", f"placements/{int(pid)}", retries=retries))[1])
        except NSMLError as e:
            if e.status == 404:
                return None
            raise

    async def mounts(self, pid: int, wait_s: float) -> tuple[int, dict[str, Any]]:
        """``POST placements/ID/mounts``: make the placement's datasets present on its node.

        Returns ``(200, answer)`` when every dataset is ready to mount, ``(202, answer)``
        while the node is still caching them (ask again). A node cache that cannot hold them
        is an :class:`NSMLError` (409).
        """
        status, out = await self.call(
            "POST",
            f"placements/{int(pid)}/mounts?wait_s={wait_s:g}",
            {},
            timeout_s=self.timeout_s + wait_s,
        )
        return status, dict(out)

    async def nodes(self) -> list[dict[str, Any]]:
        """``GET nodes``: every node with its state, engine URL, GPUs and images."""
        return list((await self.call("GET", "nodes"))[1]["nodes"])

    async def node(self, name: str) -> dict[str, Any]:
        """``GET nodes/NAME``."""
        return dict((await self.call("GET", f"nodes/{quote(name, safe='')}"))[1])


def _error_body(text: str, status: int) -> tuple[str, str]:
    try:
        data = json.loads(text)
        return str(data.get("message") or text), str(data.get("reason") or "error")
    except (ValueError, AttributeError):
        return (text[:500] or f"HTTP {status}"), "error"


def asks_the_same(request: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """Whether a stored request (``PlacementOut.request``) asks for what *body* asks for."""
    return (
        int(request.get("gpu_milli") or 0) == round(float(body.get("gpus") or 0) * 1000)
        and int(request.get("cpu_milli") or 0) == round(float(body.get("cpu") or 0) * 1000)
        and int(request.get("memory_mib") or 0) == int(body.get("memory") or 0)
        and sorted(request.get("gpu_models") or []) == sorted(body.get("gpu_models") or [])
    )


async def wait_for_placement(
    client: NSMLClient,
    body: Mapping[str, Any],
    *,
    timeout_s: float,
    poll_s: float = 10.0,
    on_wait: Callable[[dict[str, Any], float], Awaitable[None] | None] | None = None,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> dict[str, Any]:
    """Ask for a placement and wait in the queue until it is placed.

    Each ask is a long poll (``wait_s`` up to *poll_s*); asking again for the same holder
    returns the same request, so the loop just asks again. A request of the same holder that
    asks for other resources (left over from an earlier server) is released and asked anew,
    once. *on_wait* gets every waiting answer and the seconds waited so far.

    Returns:
        The placement (state ``placed``).

    Raises:
        Infeasible: it can never fit (nothing was allocated).
        QueueTimeout: still waiting after *timeout_s*; the request is left as it is (the caller
            cancels it).
        NSMLUnavailable, NSMLError: the API failed or refused.
    """
    start = now()
    replaced = False
    while True:
        left = timeout_s - (now() - start)
        wait_s = max(0.0, min(poll_s, left))
        asked = now()
        _, out = await client.place(body, wait_s=wait_s)
        state = out.get("state")
        if state in ("placed", "waiting") and not asks_the_same(out.get("request") or {}, body):
            if replaced:
                raise NSMLError(
                    409,
                    f"placement {out.get('id')} of {body.get('holder')} keeps asking for other "
                    "resources than this server",
                    "conflict",
                )
            log.warning(
                "%s/%s: releasing placement %s left over from an earlier server (it asks for "
                "%s, this server for %s)",
                body.get("user"),
                body.get("holder"),
                out.get("id"),
                out.get("request"),
                {k: body.get(k) for k in ("gpus", "gpu_models", "cpu", "memory")},
            )
            await client.release(int(out["id"]))
            replaced = True
            continue
        if state == "placed" and out.get("allocation"):
            return out
        if state != "waiting":
            raise NSMLError(
                409,
                f"placement {out.get('id')} is {state}: {out.get('reason')}",
                str(out.get("code") or "conflict"),
            )
        waited = now() - start
        if on_wait is not None:
            r = on_wait(out, waited)
            if r is not None:
                await r
        if waited >= timeout_s:
            raise QueueTimeout(out, waited)
        if now() - asked < min(wait_s, 1.0) / 2:
            # The server answered long before the poll was up: do not spin.
            await sleep(0.5)
