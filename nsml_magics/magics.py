"""The ``%nsml`` line magic and ``%%nsml`` cell magic.

The verbs are the ``nsml`` command line's, declared once (:func:`nsml.cli.build_parser`): each
magic verb parses with the CLI verb's own parser (the same converters, so the same values are
refused, with the same one-line reasons) and calls the same function. A mistake or an error
from the server is a :class:`UsageError` (one line, no traceback). Some verbs are shown richer
in a notebook (:data:`SHOWN`): ``run``, ``fork`` and ``resume`` add a live status line,
``status``, ``gpustat`` and ``leaderboard`` an HTML table (the caller's rows marked),
``plot`` the interactive comparison panel. Results and notes are the cell's output
(standard output), so that JupyterLab never shows a summary as an error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import HTML, display
from IPython.utils.process import arg_split

from nsml._args import Parser, UsageProblem
from nsml._fmt import gpu_rows, print_json
from nsml.cli import one_line
from nsml.client import Client, NSMLError
from nsml.config import ConfigError
from nsml.snapshot import SnapshotError


def split_dashdash(line: str) -> tuple[str, list[str]]:
    """``"run -g 2 train.py -- --lr 0.1"`` → ``("run -g 2 train.py", ["--lr", "0.1"])``.

    What follows the first standalone ``--`` goes to the script untouched.
    """
    try:
        words = shlex.split(line, posix=True)
    except ValueError as e:
        raise UsageError(f"cannot parse {line!r}: {e}") from None
    if "--" not in words:
        return line, []
    i = words.index("--")
    return shlex.join(words[:i]), words[i + 1 :]


def _table(
    rows: list[dict[str, Any]],
    columns: list[tuple[str, str]],
    highlight: Callable[[dict[str, Any]], bool] | None = None,
    caption: str | None = None,
) -> HTML:
    """*rows* as an HTML table; a missing or ``None`` cell is ``-`` (``0`` stays ``0``).
    Rows for which *highlight* is true are marked (``class="nsml-mine"``, bold, shaded)."""
    import html

    head = "".join(f"<th style='text-align:left'>{html.escape(t)}</th>" for _, t in columns)

    def tr(r: dict[str, Any]) -> str:
        if highlight is not None and highlight(r):
            return "<tr class='nsml-mine' style='font-weight:bold;background:rgba(255,200,0,0.25)'>"
        return "<tr>"

    cap = f"<caption style='text-align:left'>{html.escape(caption)}</caption>" if caption else ""
    body = "".join(
        tr(r)
        + "".join(
            "<td style='text-align:left'>"
            + html.escape("-" if r.get(k) is None else str(r.get(k)))
            + "</td>"
            for k, _ in columns
        )
        + "</tr>"
        for r in rows
    )
    return HTML(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def cli_verbs() -> dict[str, argparse.ArgumentParser]:
    """The `nsml` CLI's verbs and their parsers."""
    from nsml.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def magic_parser(verb: str, cli: argparse.ArgumentParser) -> Parser:
    """``%nsml VERB``'s parser: the CLI verb's arguments and converters under another name."""
    return Parser(prog=f"%nsml {verb}", description=cli.description, parents=[cli], add_help=False)


def _usage(verb: str, problem: object) -> UsageError:
    text = one_line(problem)
    if text.startswith("nsml "):
        return UsageError("%" + text)
    if text.startswith("%nsml "):
        return UsageError(text)
    return UsageError(f"%nsml {verb}: {text}")


@magics_class
class NSMLMagics(Magics):
    """``%nsml VERB ...`` and ``%%nsml run ...``."""

    _client: Client | None = None
    _parsers: dict[str, Parser] | None = None

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        # The status lines shown, by session: asyncio keeps only weak references to tasks,
        # so a line's refresh task lives as long as it is held here.
        self.lines: dict[str, Any] = {}

    @property
    def client(self) -> Client:
        if self._client is None:
            try:
                self._client = Client()
            except ConfigError as e:
                raise UsageError(str(e)) from None
        return self._client

    @property
    def parsers(self) -> dict[str, Parser]:
        if self._parsers is None:
            self._parsers = {v: magic_parser(v, p) for v, p in cli_verbs().items()}
        return self._parsers

    def verbs(self) -> list[str]:
        """The magic's verbs: the CLI's, no more and no fewer."""
        return sorted(self.parsers)

    @line_cell_magic
    def nsml(self, line: str, cell: str | None = None) -> Any:
        """Run an NSML command: ``%nsml VERB [ARGS]`` (``%nsml help`` lists the verbs)."""
        words = line.strip().split(None, 1)
        if not words:
            raise UsageError(f"usage: %nsml VERB [ARGS]; verbs: {', '.join(self.verbs())}")
        verb, rest = words[0], words[1] if len(words) > 1 else ""
        if verb in ("help", "-h", "--help"):
            print(self.help())
            return None
        if verb not in self.parsers:
            raise UsageError(f"%nsml {verb}: unknown verb; choose from {', '.join(self.verbs())}")
        if cell is not None and verb != "run":
            raise UsageError(f"%%nsml {verb}: only '%%nsml run' takes a cell (the script)")
        argline, extra = split_dashdash(rest)
        try:
            return self.dispatch(verb, argline, extra, cell)
        except UsageError:
            raise
        except NSMLError as e:
            raise _usage(verb, e.message) from None
        except (UsageProblem, ConfigError, SnapshotError, ValueError) as e:
            raise _usage(verb, e) from None
        except SystemExit:  # -h printed the verb's help
            return None
        except KeyboardInterrupt:
            return None
        except Exception as e:
            if os.environ.get("NSML_DEBUG"):
                traceback.print_exc()
            raise _usage(
                verb,
                f"unexpected error: {e.__class__.__name__}: {e} (NSML_DEBUG=1 shows the "
                "traceback; please report it)",
            ) from None

    def parse(self, verb: str, argline: str, cell: str | None) -> argparse.Namespace:
        parser = self.parsers[verb]
        argv = arg_split(argline)
        if cell is not None and verb == "run":
            # %%nsml run [OPTIONS] [SCRIPT]: the cell is the script; name it if not named.
            try:
                return parser.parse_args(argv)
            except UsageProblem as e:
                if "required" not in str(e):
                    raise
                return parser.parse_args([*argv, CELL_SCRIPT])
        return parser.parse_args(argv)

    def dispatch(self, verb: str, argline: str, extra: list[str], cell: str | None) -> Any:
        ns = self.parse(verb, argline, cell)
        ns.rest = extra
        ns.notes = sys.stdout
        if getattr(ns, "no_progress", True) is False:
            ns.progress = True  # a kernel's stderr is no terminal: show the widget bar anyway
        shown = SHOWN.get(verb)
        if shown is not None:
            return shown(self, ns, cell)
        rc = ns.fn(self.client, ns)
        if rc:
            raise UsageError(f"%nsml {verb} failed (exit status {rc}); see the message above")
        return None

    def follow(self, session: dict[str, Any], note: str = "") -> None:
        """Print the session's name (and *note*) and show its live status line (it never
        blocks)."""
        from nsml import sessions

        from .status import StatusLine

        name = str(session["name"])
        print(name)
        if note:
            print(note)
        line = StatusLine(lambda: sessions.status(self.client, name))
        line.widget.value = line.render(session)
        display(line.widget)
        line.start()
        self.lines[name] = line

    def help(self) -> str:
        lines = ["%nsml VERB [ARGS]   (%%nsml run ... takes the cell as the script)", ""]
        for name in self.verbs():
            doc = (self.parsers[name].description or "").split(". ")[0]
            lines.append(f"  {name:<8} {doc}")
        lines.append("")
        lines.append("%nsml VERB -h shows a verb's options.")
        return "\n".join(lines)


CELL_SCRIPT = "nsml_cell.py"


def _run(m: NSMLMagics, ns: argparse.Namespace, cell: str | None) -> None:
    from nsml.cli_session import start_run, upload_note

    uploads: list[Any] = []
    session = start_run(m.client, ns, cell, on_upload=uploads.append)
    m.follow(session, "\n".join(upload_note(u) for u in uploads))


def _fork(m: NSMLMagics, ns: argparse.Namespace, cell: str | None) -> None:
    from nsml.cli_session import start_fork

    m.follow(start_fork(m.client, ns))


def _resume(m: NSMLMagics, ns: argparse.Namespace, cell: str | None) -> None:
    from nsml import sessions

    m.follow(sessions.resume(m.client, ns.session))


def _status(m: NSMLMagics, ns: argparse.Namespace, cell: str | None) -> None:
    from nsml import sessions
    from nsml.cli_session import status_text

    from .status import render_status

    st = sessions.status(m.client, ns.session)
    if ns.json:
        print_json(st)
        return
    display(HTML(render_status(st)))
    print(status_text(st))


def _gpustat(m: NSMLMagics, ns: argparse.Namespace, cell: str | None) -> None:
    from nsml.cli import GPUSTAT_COLUMNS

    nodes = m.client.nodes(state=ns.state)
    if ns.json:
        print_json(nodes)
        return
    display(_table(list(gpu_rows(nodes)), GPUSTAT_COLUMNS))


def _plot(m: NSMLMagics, ns: argparse.Namespace, cell: str | None) -> None:
    from nsml.cli_plot import MAX_SESSIONS, needs_bokeh, plot_kwargs

    needs_bokeh()
    from .comparison import LivePanel, compare_panel, write_html

    kwargs = plot_kwargs(ns)
    panel, statuses = compare_panel(*ns.sessions, client=m.client, **kwargs)
    if len(panel.runs) > MAX_SESSIONS:
        raise UsageError(
            f"%nsml plot: {len(panel.runs)} sessions chosen; a panel compares at most "
            f"{MAX_SESSIONS}"
        )
    if ns.html:
        print(f"wrote {write_html(panel, ns.html)}")
    live = LivePanel(m.client, panel, statuses, max_points=kwargs["max_points"]).show()
    m.lines["plot:" + ",".join(r.name for r in panel.runs)] = live


def _gpumonitor(m: NSMLMagics, ns: argparse.Namespace, cell: str | None) -> None:
    from nsml import sessions
    from nsml.cli_plot import needs_bokeh

    answer = sessions.gpu_use(m.client, ns.session)
    if ns.json:
        print_json(answer)
        return
    needs_bokeh()
    from .comparison import load_bokehjs
    from .gpumonitor import LiveGpuMonitor, build_gpu_panel, summary

    print(summary(answer))
    load_bokehjs()
    key = "gpumonitor:" + str(answer["session"])
    shown = m.lines.get(key)
    if shown is not None and shown.task is not None:
        shown.task.cancel()  # the newer panel follows the session; the older stays as it is
    m.lines[key] = LiveGpuMonitor(m.client, answer).show()
    if ns.html:
        from bokeh.embed import file_html
        from bokeh.resources import INLINE

        with open(ns.html, "w") as f:
            f.write(file_html(build_gpu_panel(answer), INLINE, title=answer["session"]))
        print(f"wrote {ns.html}")


def _leaderboard(m: NSMLMagics, ns: argparse.Namespace, cell: str | None) -> None:
    from urllib.parse import quote

    from nsml.cli_board import BOARD_COLUMNS, board_rows, board_title

    board = m.client.request(
        "GET", f"datasets/{quote(ns.dataset, safe='')}/leaderboard", all="1" if ns.all else "0"
    )
    if ns.json:
        print_json(board)
        return
    columns = list(BOARD_COLUMNS)
    if board["closed"] and board["has_private"]:
        columns.insert(5, ("public", "PUBLIC"))
    display(_table(board_rows(board), columns, lambda r: bool(r.get("mine")), board_title(board)))


#: CLI verbs that a notebook shows its own way (the arguments are still the CLI verb's).
SHOWN: dict[str, Callable[[NSMLMagics, argparse.Namespace, str | None], Any]] = {
    "run": _run,
    "fork": _fork,
    "resume": _resume,
    "status": _status,
    "gpustat": _gpustat,
    "plot": _plot,
    "gpumonitor": _gpumonitor,
    "leaderboard": _leaderboard,
}
