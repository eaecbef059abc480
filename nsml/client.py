"""HTTP client of the NSML API, shared by the CLI, the magics and training code."""

from __future__ import annotations

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
            NSMLError: the API answered an error (its message and reason), or is unreachable.
        """
        r = self.raw(method, path, json=body, params=params)
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
        try:
            r = self._http.request(
                method,
                url,
                params={k: v for k, v in (params or {}).items() if v is not None},
                timeout=timeout or self.timeout,
                stream=stream,
                **kwargs,
            )
        except requests.RequestException as e:
            raise NSMLError(
                f"Cannot reach the NSML API at {self.config.api_url} ({e.__class__.__name__}). "
                "Is the hub running? Check NSML_API_URL.",
                reason="unreachable",
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
