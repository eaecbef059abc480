"""The NSML sidebar's server side: a jupyter-server extension of every notebook server.

It adds to the notebook server (all behind its own login, ``@tornado.web.authenticated``):

- ``{base_url}nsml/api/<path>`` (GET, POST, PUT, PATCH, DELETE): the NSML service's
  ``api/<path>``, called with the notebook server's own hub token, so that the browser never
  holds a token (:mod:`.forward`);
- ``{base_url}nsml/stream`` (also ``nsml/api/stream`` and ``nsml/api/events/stream``): the
  service's event stream as server-sent events, from **one** upstream connection per notebook
  server shared by every panel and tab (:mod:`.stream`).

The JupyterLab side (the sidebar) is the prebuilt labextension in ``labextension/``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "jupyter-nsml-lab"}]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "jupyter_nsml_lab"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    """Add the forwarder's routes to *server_app* (a ``jupyter_server`` ``ServerApp``)."""
    from .handlers import setup_handlers

    setup_handlers(server_app)
