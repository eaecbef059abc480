"""The hub admin panel, served by the NSML service at ``/services/nsml/admin/``.

Server-rendered pages (Jinja2) with small scripts and Bokeh charts (BokehJS inline: the
platform runs offline), for hub admins only:

- identity through JupyterHub OAuth (:class:`jupyterhub.services.auth.HubOAuth`): a visitor
  without the service's cookie is sent through the hub's login and comes back signed in;
- every page answers 403 (an HTML page that says why) to a signed-in user who is not a hub
  admin;
- every form carries the XSRF token; a post without it, or with a wrong one, is refused
  with 403 before anything changes;
- every change made from the panel writes an audit row (:mod:`nsml_server.audit`), listed on
  the panel's audit page.

:class:`AdminPanel` holds the panel's settings (``c.AdminPanel.*`` in the server's config);
:meth:`AdminPanel.handlers` gives its routes to the server's tornado application and
:meth:`AdminPanel.tornado_settings` the cookie secret its sign-in needs.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traitlets import Float, Int, Unicode, validate
from traitlets.config import LoggingConfigurable

from ..db import Database


class AdminPanel(LoggingConfigurable):
    """Settings and routes of the admin panel."""

    chart_hours = Float(
        24.0,
        help="""Hours of history the charts page shows (GPU allocation and use over time);
        default 24. The page's ?hours= overrides it per view, up to 24 * 90.""",
    ).tag(config=True)

    chart_buckets = Int(
        96,
        help="""Bars in the GPU-use chart (the window is cut into this many equal buckets);
        default 96 (15 minutes each over 24 hours).""",
    ).tag(config=True)

    usage_days = Int(
        14, help="Days of usage (credits charged, GPU-hours) shown on a user's page; default 14."
    ).tag(config=True)

    page_size = Int(
        100, help="Rows per page of the audit log and of a user's ledger; default 100."
    ).tag(config=True)

    cookie_secret_file = Unicode(
        "",
        help="""File holding the secret that signs the panel's sign-in and XSRF cookies
        (created with mode 0600 when missing). Default: admin_cookie_secret in the server's
        state folder. Servers that share a URL (a standby) should share it, or admins sign
        in again after a takeover (the hub signs them in again without a question).""",
    ).tag(config=True)

    @validate("chart_hours")
    def _hours(self, proposal: Any) -> float:
        v = float(proposal["value"])
        if not 0 < v <= 24 * 90:
            raise ValueError(f"AdminPanel.chart_hours must be > 0 and at most 2160, not {v}")
        return v

    @validate("chart_buckets", "usage_days", "page_size")
    def _positive(self, proposal: Any) -> int:
        v = int(proposal["value"])
        if not 1 <= v <= 10_000:
            raise ValueError(f"AdminPanel.{proposal['trait'].name} must be 1 to 10000, not {v}")
        return v

    def cookie_secret(self, state_dir: Path) -> bytes:
        """The cookie secret, read from (or first written to) :attr:`cookie_secret_file`."""
        path = Path(self.cookie_secret_file or state_dir / "admin_cookie_secret").expanduser()
        if path.exists():
            text = path.read_text().strip()
            if len(text) >= 32:
                return text.encode()
            self.log.warning("%s holds a secret shorter than 32 characters; making a new one", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        value = secrets.token_hex(32)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        return value.encode()

    def tornado_settings(self, state_dir: Path) -> dict[str, Any]:
        """Settings the tornado application needs for the panel (the cookie secret)."""
        return {"cookie_secret": self.cookie_secret(state_dir)}

    def handlers(
        self,
        db: Database,
        base_url: str,
        now: Callable[[], Any],
        wake_runner: Callable[[], None],
        hub_auth: Any = None,
    ) -> list[tuple[Any, ...]]:
        """The panel's routes under ``BASE_URL admin/`` and the OAuth callback.

        *hub_auth*: a HubOAuth client; None makes one from the ``JUPYTERHUB_*`` variables
        the hub gives a managed service. Without them (a server not started by the hub) the
        pages answer 503 and say so.
        """
        from .handlers import AdminContext, routes

        oauth, problem = hub_auth, ""
        if oauth is None:
            oauth, problem = make_oauth(self)
        ctx = AdminContext(
            panel=self,
            db=db,
            base_url=base_url,
            now=now,
            wake_runner=wake_runner,
            oauth=oauth,
            oauth_problem=problem,
        )
        return routes(ctx)


def make_oauth(parent: LoggingConfigurable) -> tuple[Any, str]:
    """A HubOAuth client from the hub's variables, or ``(None, why not)``."""
    from jupyterhub.services.auth import HubOAuth

    missing = [k for k in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_CLIENT_ID") if not os.environ.get(k)]
    if missing:
        return None, (
            f"the admin panel signs admins in through the hub's OAuth, and {', '.join(missing)} "
            "is not set: run the NSML server as the hub's managed service `nsml`"
        )
    try:
        return HubOAuth(parent=parent, cache_max_age=60), ""
    except Exception as e:  # a bad variable: say which, keep the API serving
        return None, f"the hub's OAuth settings are not usable: {e}"
