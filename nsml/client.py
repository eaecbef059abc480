"""HTTP client of the NSML API, shared by the CLI, the magics and training code."""

from __future__ import annotations

import json
import math
from typing import Any

import requests

from .config import ClientConfig, resolve


class NSMLError(RuntimeError):
    """An error answered by the NSML API (or the failure to reach it)."""

    def __init__(self, message: str, status: int = 0, reason: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason


def _non_finite(value: Any, at: str = "") -> str | None:
    """The path of the first float in *value* that JSON cannot carry, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return at or "the body"
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f"{at}.{k}" if at else str(k))
            if found:
                return found
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{at}[{i}]")
            if found:
                return found
    return None


def encode_json(body: Any) -> bytes:
    """*body* as strict JSON (RFC 8259: no NaN, no Infinity).

    Raises:
        NSMLError: *body* holds a non-finite number (named by its path) or something JSON
            cannot carry; nothing is sent.
    """
    try:
        return json.dumps(body, allow_nan=False).encode()
    except ValueError:
        where = _non_finite(body)
        raise NSMLError(
            f"{where} is not a finite number (NaN or infinity); nothing was sent.",
            0,
            "bad_request",
        ) from None
    except TypeError as e:
        raise NSMLError(f"the request cannot be sent as JSON: {e}", 0, "bad_request") from None


class Client:
    """A thin, synchronous client: one method per endpoint, JSON in and out."""

    def __init__(self, config: ClientConfig | None = None, timeout: float = 30.0) -> None:
        self.config = config or resolve()
        self.timeout = timeout
        self._http = requests.Session()
        if self.config.token:
            self._http.headers["Authorization"] = f"token {self.config.token}"
        self._http.headers["User-Agent"] = "nsml-client"

    def request(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        """Call the API with a JSON body (or none); return the decoded JSON answer.

        Raises:
            NSMLError: the API answered an error (its message and reason), or is unreachable;
                or *body* holds a value JSON cannot carry (NaN, an infinity), in which case
                nothing is sent.
        """
        if body is None:
            r = self.raw(method, path, params=params)
        else:
            r = self.raw(
                method,
                path,
                data=encode_json(body),
                headers={"Content-Type": "application/json"},
                params=params,
            )
        if r.status_code == 204 or not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            return None

    def raw(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        stream: bool = False,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """Call the API and return the response itself (binary bodies, streams); errors are
        raised as :class:`NSMLError` like :meth:`request`."""
        url = self.config.url(path)
        for key, value in (params or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise NSMLError(
                    f"{key}={value} is not a finite number; nothing was sent.", 0, "bad_request"
                )
        try:
            r = self._http.request(
                method,
                url,
                params={k: v for k, v in (params or {}).items() if v is not None},
                timeout=timeout or self.timeout,
                stream=stream,
                **kwargs,
            )
        except (requests.ConnectionError, requests.Timeout) as e:
            raise NSMLError(
                f"Cannot reach the NSML API at {self.config.api_url} ({e.__class__.__name__}). "
                "Is the hub running? Check NSML_API_URL.",
                reason="unreachable",
            ) from e
        except requests.RequestException as e:
            raise NSMLError(
                f"Could not send {method} {url}: {e.__class__.__name__}: {e}. Check NSML_API_URL.",
                reason="bad_request",
            ) from e
        if r.status_code >= 400:
            try:
                data = r.json()
            except ValueError:
                data = None
            if isinstance(data, dict) and "message" in data:
                raise NSMLError(str(data["message"]), r.status_code, str(data.get("reason")))
            raise NSMLError(
                f"{method} {url} answered {r.status_code} {r.reason}", r.status_code, "http_error"
            )
        return r

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "health")
        return result

    def me(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "me")
        return result

    def nodes(self, state: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "nodes", state=state)["nodes"]
        return result

    def set_node_state(self, name: str, state: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("PATCH", f"nodes/{name}", {"state": state})
        return result
