"""``nsml plot``: compare sessions' curves and arguments (the panel is Bokeh: it needs the
``notebook`` extra, ``pip install 'jupyter-nsml[notebook]'``).

In a terminal it prints the exclusive / common argument split and, with ``--html FILE``,
writes the interactive panel as one standalone HTML file (BokehJS inline: it opens offline).
In a notebook, ``%nsml plot`` shows the panel in the cell's output and keeps it live.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import _args
from .client import Client

#: Most sessions one panel compares (each is one line in every plot).
MAX_SESSIONS = 200


def smoothing(text: str) -> float:
    """``--smooth W``: TensorBoard's smoothing weight, 0 to below 1."""
    try:
        w = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (0 to 0.999)") from None
    if not 0 <= w < 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range: use 0 (none) to 0.999")
    return w


def plot_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`nsml_magics.comparison.compare_panel` from the verb's."""
    return {
        "metric": args.metric or None,
        "lineage": args.lineage or (),
        "last": args.last,
        "smooth": args.smooth,
        "log": args.log,
        "x": args.x,
        "colour_by": args.colour_by,
        "max_points": args.max_points,
    }


def needs_bokeh() -> None:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        raise ValueError("nsml plot needs Bokeh: pip install 'jupyter-nsml[notebook]'") from None


def cmd_plot(client: Client, args: argparse.Namespace) -> int:
    needs_bokeh()
    from nsml_magics.comparison import compare_panel, summary_text, write_html

    panel, _ = compare_panel(*args.sessions, client=client, **plot_kwargs(args))
    if len(panel.runs) > MAX_SESSIONS:
        raise ValueError(
            f"{len(panel.runs)} sessions chosen; a panel compares at most {MAX_SESSIONS}"
        )
    print(summary_text(panel))
    if args.html:
        print(f"wrote {write_html(panel, args.html)}")
    return 0


def cmd_gpumonitor(client: Client, args: argparse.Namespace) -> int:
    from . import sessions
    from ._fmt import print_json

    answer = sessions.gpu_use(client, args.session)
    if args.json:
        print_json(answer)
        return 0
    from nsml_magics.gpumonitor import summary

    print(summary(answer))
    if args.html:
        needs_bokeh()
        from bokeh.embed import file_html
        from bokeh.resources import INLINE

        from nsml_magics.gpumonitor import build_gpu_panel

        with open(args.html, "w") as f:
            f.write(file_html(build_gpu_panel(answer), INLINE, title=f"NSML: {answer['session']}"))
        print(f"wrote {args.html}")
    return 0


def add_plot_verb(sub: argparse._SubParsersAction[_args.Parser]) -> None:
    """Add ``plot`` to the ``nsml`` parser's subcommands."""
    help = (
        "compare sessions: one plot per metric, one line per session, and the arguments "
        "that differed (exclusive) beside those all share (common); e.g. nsml plot "
        "alice/mnist/* --metric loss --html runs.html"
    )
    sp: argparse.ArgumentParser = sub.add_parser("plot", help=help, description=help)
    sp.set_defaults(fn=cmd_plot, json=False)
    sp.add_argument(
        "sessions",
        nargs="*",
        metavar="SESSION",
        help="USER/DATASET/N, DATASET/N, or a pattern over your sessions (alice/mnist/*)",
    )
    sp.add_argument(
        "--lineage",
        action="append",
        metavar="SESSION",
        help="SESSION and every session forked from it (repeatable)",
    )
    sp.add_argument(
        "--last",
        type=_args.integer(1, MAX_SESSIONS, "a number of sessions"),
        metavar="N",
        help=f"your newest N sessions (1 to {MAX_SESSIONS})",
    )
    sp.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help="plot this metric (repeatable; default all)",
    )
    sp.add_argument(
        "--smooth",
        type=smoothing,
        default=0.0,
        metavar="W",
        help="smoothing weight as TensorBoard's, 0 (none, the default) to 0.999",
    )
    sp.add_argument("--log", action="store_true", help="logarithmic y axes")
    sp.add_argument(
        "--x",
        choices=["step", "time"],
        default="step",
        help="x axis: step (default) or time since each session's first report",
    )
    sp.add_argument(
        "--colour-by",
        metavar="ARG",
        help="colour the lines by this argument's value (lr for --lr; #1 for the first "
        "positional one)",
    )
    sp.add_argument(
        "--max-points",
        type=_args.integer(2, 100_000, "a number of points"),
        default=600,
        metavar="N",
        help="points per line the server sends (downsampled, extremes and NaN kept; "
        "default 600; zooming in a notebook fetches the exact points)",
    )
    sp.add_argument("--html", metavar="FILE", help="also write the panel as a standalone HTML file")

    help = (
        "a session's GPU use over time: utilisation and memory of each of its GPUs (sampled "
        "with every node heartbeat; virtual GPUs report none)"
    )
    sp = sub.add_parser("gpumonitor", help=help, description=help)
    sp.set_defaults(fn=cmd_gpumonitor)
    sp.add_argument("session", help="USER/DATASET/N or DATASET/N")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--html", metavar="FILE", help="also write the plots as a standalone HTML file")
