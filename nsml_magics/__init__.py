"""``%nsml`` / ``%%nsml``: the NSML platform from a notebook.

``%load_ext nsml_magics`` (the notebook image loads it for every kernel). Every verb of the
``nsml`` command line is a magic verb over the same client library::

    %nsml run --gpus 2 -d mnist train.py -- --lr 0.1
    %%nsml run --gpus 1            # the cell is the script
    %nsml ps
    %nsml logs alice/mnist/3 -f
    %nsml dataset push mnist ./data
    %nsml plot alice/mnist/* --metric loss      # curves side by side, arguments split

``nsml_magics.compare(...)`` returns the same comparison panel as a Bokeh layout.

Mistakes raise :class:`IPython.core.error.UsageError` (a one-line message with the valid
choices, no traceback); errors from the server are shown the same way.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compare", "load_ipython_extension", "unload_ipython_extension"]


def compare(*refs: str, **options: Any) -> Any:
    """The comparison panel of sessions as a Bokeh layout (see
    :func:`nsml_magics.comparison.compare`; Bokeh is imported only when it is called)."""
    from .comparison import compare as build

    return build(*refs, **options)


def load_ipython_extension(ip: Any) -> None:
    """Register ``%nsml`` / ``%%nsml`` in the IPython shell *ip*."""
    from .magics import NSMLMagics

    ip.register_magics(NSMLMagics)


def unload_ipython_extension(ip: Any) -> None:
    """Nothing to undo: IPython keeps registered magics until the kernel restarts."""
