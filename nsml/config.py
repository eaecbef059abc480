"""Where the ``nsml`` client finds the API and its token.

Order, first match wins:

1. ``NSML_API_URL`` and ``NSML_TOKEN``;
2. inside a notebook server, the hub's environment: the token ``JUPYTERHUB_API_TOKEN``, and the
   API URL from ``JUPYTERHUB_PUBLIC_HUB_URL`` (``…/hub/`` → ``…/services/nsml/api/``), else
   from the hub API (``JUPYTERHUB_API_URL``), which tells where the ``nsml`` service is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

SERVICE_NAME = "nsml"


class ConfigError(RuntimeError):
    """The client cannot tell where the NSML API is or which token to use."""


@dataclass(frozen=True)
class ClientConfig:
    api_url: str
    token: str
    source: str

    def url(self, path: str) -> str:
        return self.api_url.rstrip("/") + "/" + path.lstrip("/")


def _service_url_from_hub(
    api_url: str, token: str, fetch: Callable[[str, str], dict[str, object]] | None
) -> str | None:
    """Ask the hub API where the ``nsml`` service lives."""
    if fetch is None:
        return None
    try:
        model = fetch(api_url.rstrip("/") + f"/services/{SERVICE_NAME}", token)
    except Exception:
        return None
    url, prefix = model.get("url"), model.get("prefix")
    if isinstance(url, str) and url and isinstance(prefix, str):
        return url.rstrip("/") + "/" + prefix.strip("/") + "/api/"
    return None


def _fetch_json(url: str, token: str) -> dict[str, object]:
    import requests

    r = requests.get(url, headers={"Authorization": f"token {token}"}, timeout=10)
    r.raise_for_status()
    data = r.json()
    return data if isinstance(data, dict) else {}


def resolve(
    env: Mapping[str, str] | None = None,
    fetch: Callable[[str, str], dict[str, object]] | None = _fetch_json,
    *,
    require_token: bool = True,
) -> ClientConfig:
    """Resolve the API URL and token from *env* (default: the process environment)."""
    env = os.environ if env is None else env
    token = env.get("NSML_TOKEN") or env.get("JUPYTERHUB_API_TOKEN") or ""
    token_source = "NSML_TOKEN" if env.get("NSML_TOKEN") else "JUPYTERHUB_API_TOKEN"
    if env.get("NSML_API_URL"):
        api, source = env["NSML_API_URL"], "NSML_API_URL"
    elif env.get("JUPYTERHUB_PUBLIC_HUB_URL"):
        hub = env["JUPYTERHUB_PUBLIC_HUB_URL"].rstrip("/")
        base = hub[: -len("/hub")] if hub.endswith("/hub") else hub
        api, source = f"{base}/services/{SERVICE_NAME}/api/", "JUPYTERHUB_PUBLIC_HUB_URL"
    else:
        found = None
        if env.get("JUPYTERHUB_API_URL") and token:
            found = _service_url_from_hub(env["JUPYTERHUB_API_URL"], token, fetch)
        if found is None:
            raise ConfigError(
                "Where is the NSML API? Set NSML_API_URL (e.g. "
                "http://127.0.0.1:8000/services/nsml/api/) and NSML_TOKEN (a JupyterHub API "
                "token from /hub/token). Inside a notebook server these come from the hub."
            )
        api, source = found, "JUPYTERHUB_API_URL"
    if not token and require_token:
        raise ConfigError(
            "No token: set NSML_TOKEN to a JupyterHub API token (create one at /hub/token)."
        )
    return ClientConfig(api_url=api, token=token, source=f"{source}, {token_source}")
