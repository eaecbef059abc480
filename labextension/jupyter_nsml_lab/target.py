"""Where the forwarder sends a request (pure: plain values in, plain values out).

- :func:`service_from_env`: the NSML API's URL and the token, from the notebook server's
  environment (the order of the ``nsml`` client, :mod:`nsml.config`);
- :func:`api_target`: the service URL of a path the browser asked for, or a refusal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

SERVICE_NAME = "nsml"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SAFE = "@:,=+~!$'()*"
"""Characters kept as they are in a path segment sent to the service (RFC 3986 pchar less
``;`` and ``&``); everything else is percent-encoded again."""


class TargetError(Exception):
    """The browser's path is not one of the API's: a status and a sentence for the caller."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class Service:
    """The NSML API (``…/services/nsml/api/``) and the token to call it with.

    Attributes:
        api_url: the API's URL, ending in ``/``.
        token: the notebook server's own hub token.
        source: the environment variable the URL came from (for log lines).
    """

    api_url: str
    token: str
    source: str


def service_from_env(env: Mapping[str, str], api_url: str = "") -> Service | None:
    """The API and token from *env*, or None when *env* does not say where the API is.

    The token is the notebook server's own (``JUPYTERHUB_API_TOKEN``; ``NSML_TOKEN`` when
    only that is set). The URL: *api_url* (configured), else ``NSML_API_URL`` (the
    spawner sets the service's direct address), else the public hub URL
    ``JUPYTERHUB_PUBLIC_HUB_URL`` (``…/hub/`` → ``…/services/nsml/api/``).
    """
    token = env.get("JUPYTERHUB_API_TOKEN") or env.get("NSML_TOKEN") or ""
    if not token:
        return None
    if api_url:
        return Service(_slash(api_url), token, "NSMLForwarder.api_url")
    if env.get("NSML_API_URL"):
        return Service(_slash(env["NSML_API_URL"]), token, "NSML_API_URL")
    hub = env.get("JUPYTERHUB_PUBLIC_HUB_URL", "").rstrip("/")
    if hub:
        base = hub[: -len("/hub")] if hub.endswith("/hub") else hub
        return Service(f"{base}/services/{SERVICE_NAME}/api/", token, "JUPYTERHUB_PUBLIC_HUB_URL")
    return None


def service_from_hub_model(model: Mapping[str, object], token: str) -> Service | None:
    """The API from the hub's answer to ``GET hub/api/services/nsml`` (its url and prefix)."""
    url, prefix = model.get("url"), model.get("prefix")
    if isinstance(url, str) and url and isinstance(prefix, str):
        api = url.rstrip("/") + "/" + prefix.strip("/") + "/api/"
        return Service(api, token, "JUPYTERHUB_API_URL")
    return None


def _slash(url: str) -> str:
    return url.rstrip("/") + "/"


def api_target(api_url: str, raw_path: str, query: str = "") -> str:
    """The service URL for *raw_path*, the part of the request path after ``nsml/api/`` as it
    arrived (percent-encoded), and the request's *query*.

    Refused (:class:`TargetError`): an empty path (404); a segment that is empty, ``.`` or
    ``..``, also when percent-encoded (``%2e%2e``); an encoded ``/`` or a ``\\`` (they
    would name another path at the service); control characters; anything that would not
    stay under *api_url* (400).
    """
    if not raw_path.strip("/"):
        raise TargetError(
            404, "Give an API path after nsml/api/, e.g. nsml/api/sessions.", "not_found"
        )
    segments = []
    for seg in raw_path.split("/"):
        try:
            value = unquote(seg, errors="strict") if "%" in seg else seg
        except UnicodeDecodeError:
            value = "\x00"  # not UTF-8: refused below
        if value in ("", ".", "..") or "/" in value or "\\" in value or _CONTROL.search(value):
            raise TargetError(
                400,
                f"Not an NSML API path: {raw_path[:200]!r}; the path must name an API "
                "endpoint below nsml/api/ (no empty, '.' or '..' segments).",
                "bad_path",
            )
        segments.append(quote(value, safe=_SAFE))
    url = api_url + "/".join(segments)
    if not url.startswith(api_url) or "://" in url[len(api_url) :]:
        raise TargetError(400, f"Not an NSML API path: {raw_path[:200]!r}.", "bad_path")
    if _CONTROL.search(query):
        raise TargetError(400, "The query string holds control characters.", "bad_path")
    return url + ("?" + query if query else "")
