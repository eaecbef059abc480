"""The ``%nsml`` line magic and ``%%nsml`` cell magic.

One verb per NSML command. Each verb is a function whose arguments are declared with
IPython's ``magic_arguments`` (so ``%nsml VERB -h``-style help comes from the same place as the
parsing); an argument mistake is a :class:`UsageError` naming the valid choices. The verbs
call the client library (:mod:`nsml.sessions`, :mod:`nsml.datasets`, :class:`nsml.Client`)
and only format what it returns.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import (
    MagicArgumentParser,
    argument,
    magic_arguments,
    parse_argstring,
)
from IPython.display import HTML, display
from IPython.utils.process import arg_split

from nsml._fmt import print_json
from nsml.client import Client, NSMLError
from nsml.config import ConfigError

Verb = Callable[["NSMLMagics", str, list[str], str | None], Any]


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


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> HTML:
    import html

    head = "".join(f"<th style='text-align:left'>{html.escape(t)}</th>" for _, t in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td style='text-align:left'>{html.escape(str(r.get(k, '') or ''))}</td>"
            for k, _ in columns
        )
        + "</tr>"
        for r in rows
    )
    return HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


# ---- verbs -----------------------------------------------------------------------------
#
# Every verb of the `nsml` command line is a verb here, parsed by an IPython
# MagicArgumentParser built on the CLI's own sub-parser (one declaration of each verb's
# arguments; mistakes raise UsageError). `run`, `fork`, `resume` and `status` add a live status
# line; `gpustat` exists only here.


@magic_arguments()
@argument("--json", action="store_true", help="print the raw JSON")
def _gpustat_args(line: str) -> None:
    """%nsml gpustat [--json]: the cluster's GPUs, node by node (allocation and use)."""


def cli_verbs() -> dict[str, argparse.ArgumentParser]:
    """The `nsml` CLI's verbs and their parsers."""
    from nsml.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def magic_parser(verb: str, cli: argparse.ArgumentParser) -> MagicArgumentParser:
    """``%nsml VERB``'s parser: the CLI verb's arguments, IPython's error handling."""
    return MagicArgumentParser(
        prog=f"%nsml {verb}", description=cli.description, parents=[cli], add_help=False
    )


@magics_class
class NSMLMagics(Magics):
    """``%nsml VERB ...`` and ``%%nsml run ...``."""

    _client: Client | None = None
    _parsers: dict[str, MagicArgumentParser] | None = None

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
    def parsers(self) -> dict[str, MagicArgumentParser]:
        if self._parsers is None:
            self._parsers = {v: magic_parser(v, p) for v, p in cli_verbs().items()}
        return self._parsers

    def verbs(self) -> list[str]:
        return sorted({*self.parsers, *MAGIC_ONLY})

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
        if verb not in self.parsers and verb not in MAGIC_ONLY:
            raise UsageError(f"%nsml {verb}: unknown verb; choose from {', '.join(self.verbs())}")
        if cell is not None and verb != "run":
            raise UsageError(f"%%nsml {verb}: only '%%nsml run' takes a cell (the script)")
        argline, extra = split_dashdash(rest)
        try:
            if verb in MAGIC_ONLY:
                return MAGIC_ONLY[verb](self, argline, extra, cell)
            return self.dispatch(verb, argline, extra, cell)
        except NSMLError as e:
            raise UsageError(f"%nsml {verb}: {e.message}") from None
        except SystemExit:  # -h printed the verb's help
            return None
        except KeyboardInterrupt:
            return None

    def parse(self, verb: str, argline: str, cell: str | None) -> argparse.Namespace:
        parser = self.parsers[verb]
        argv = arg_split(argline)
        if cell is not None and verb == "run":
            # %%nsml run [OPTIONS] [SCRIPT]: the cell is the script; name it if not named.
            try:
                return parser.parse_args(argv)
            except UsageError as e:
                if "required" not in str(e):
                    raise
                return parser.parse_args([*argv, CELL_SCRIPT])
        return parser.parse_args(argv)

    def dispatch(self, verb: str, argline: str, extra: list[str], cell: str | None) -> Any:
        ns = self.parse(verb, argline, cell)
        ns.rest = extra
        special = FOLLOWED.get(verb)
        if special is not None:
            return special(self, ns, cell)
        rc = ns.fn(self.client, ns)
        if rc:
            raise UsageError(f"%nsml {verb} failed (exit status {rc}); see the message above")
        return None

    def follow(self, session: dict[str, Any]) -> None:
        """Print the session's name and show its live status line (it never blocks)."""
        from nsml import sessions

        from .status import StatusLine

        name = str(session["name"])
        print(name)
        line = StatusLine(lambda: sessions.status(self.client, name))
        line.widget.value = line.render(session)
        display(line.widget)
        line.start()
        self.lines[name] = line

    def help(self) -> str:
        lines = ["%nsml VERB [ARGS]   (%%nsml run ... takes the cell as the script)", ""]
        for name in self.verbs():
            if name in MAGIC_ONLY:
                doc = (MAGIC_ONLY[name].__doc__ or "").strip().splitlines()[0]
            else:
                doc = (self.parsers[name].description or "").split(". ")[0]
            lines.append(f"  {name:<8} {doc}")
        lines.append("")
        lines.append("%nsml VERB -h shows a verb's options.")
        return "\n".join(lines)


CELL_SCRIPT = "nsml_cell.py"


def _run(m: NSMLMagics, ns: argparse.Namespace, cell: str | None) -> None:
    from nsml.cli_session import start_run

    m.follow(start_run(m.client, ns, cell))


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


FOLLOWED: dict[str, Callable[[NSMLMagics, argparse.Namespace, str | None], Any]] = {
    "run": _run,
    "fork": _fork,
    "resume": _resume,
    "status": _status,
}


def _gpustat(self: NSMLMagics, line: str, extra: list[str], cell: str | None) -> None:
    """the cluster's GPUs: per node, allocation and utilization."""
    args = parse_argstring(_gpustat_args, line)
    nodes = self.client.nodes()
    if args.json:
        print_json(nodes)
        return
    rows = []
    for n in nodes:
        for g in n.get("gpus") or []:
            used = g.get("allocated_milli", 0) / 1000
            rows.append(
                {
                    "node": n["name"],
                    "state": n["state"],
                    "gpu": g["index"],
                    "model": g["model"],
                    "allocated": f"{used:g}",
                    "memory": f"{g.get('memory_used_mib', 0)}/{g['memory_total_mib']} MiB",
                    "util": "" if g.get("utilization_pct") is None else f"{g['utilization_pct']}%",
                }
            )
        if not n.get("gpus"):
            rows.append({"node": n["name"], "state": n["state"], "model": "no GPUs"})
    cols = [
        ("node", "NODE"),
        ("state", "STATE"),
        ("gpu", "GPU"),
        ("model", "MODEL"),
        ("allocated", "ALLOCATED"),
        ("memory", "MEMORY"),
        ("util", "UTIL"),
    ]
    display(_table(rows, cols))


MAGIC_ONLY: dict[str, Verb] = {
    "gpustat": _gpustat,
}
