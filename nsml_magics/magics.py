"""The ``%nsml`` line magic and ``%%nsml`` cell magic.

One verb per NSML command. Each verb is a function whose arguments are declared with
IPython's ``magic_arguments`` (so ``%nsml VERB -h``-style help comes from the same place as the
parsing); an argument mistake is a :class:`UsageError` naming the valid choices. The verbs
call the client library (:mod:`nsml.sessions`, :mod:`nsml.datasets`, :class:`nsml.Client`)
and only format what it returns.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import HTML, display

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


# ---- verb argument declarations (parsed with parse_argstring) ------------------------------


@magic_arguments()
@argument("--json", action="store_true", help="print the raw JSON")
def _gpustat_args(line: str) -> None:
    """%nsml gpustat [--json]: the cluster's GPUs, node by node (allocation and use)."""


@magic_arguments()
@argument("--gpus", "-g", type=float, default=0, help="GPUs (0, a fraction below 1, or k whole)")
@argument(
    "--dataset",
    "-d",
    action="append",
    default=[],
    metavar="DATASET",
    help="a dataset to mount read-only ('name' or 'name@version'); repeatable",
)
@argument("--memory", "-m", default=None, help="memory limit, e.g. 8G")
@argument("--cpu", "-c", type=float, default=None, help="CPU cores")
@argument("--image", default=None, help="container image (default: the notebook's)")
@argument("--memo", default=None, help="a note kept with the session")
@argument("script", nargs="?", default=None, help="the entry point (omit with %%nsml run)")
def _run_args(line: str) -> None:
    """%nsml run [--gpus N] [-d DATASET ...] [--memory 8G] [--image I] SCRIPT -- ARGS"""


@magic_arguments()
@argument("--all", "-a", action="store_true", help="finished sessions too")
@argument("--json", action="store_true", help="print the raw JSON")
def _ps_args(line: str) -> None:
    """%nsml ps [--all] [--json]: my sessions."""


@magic_arguments()
@argument("session", help="user/dataset/N, or a unique suffix such as 'mnist/3' or '3'")
@argument("--json", action="store_true", help="print the raw JSON")
def _session_args(line: str) -> None:
    """A verb that takes one session."""


@magic_arguments()
@argument("session", help="user/dataset/N")
@argument("--follow", "-f", action="store_true", help="keep printing until the session ends")
@argument("--tail", "-n", type=int, default=None, help="only the last N lines")
def _logs_args(line: str) -> None:
    """%nsml logs SESSION [-f] [--tail N]"""


@magic_arguments()
@argument("session", help="user/dataset/N")
@argument("--grace", type=float, default=None, help="seconds between SIGTERM and SIGKILL")
def _stop_args(line: str) -> None:
    """%nsml stop SESSION [--grace S]"""


@magic_arguments()
@argument("source", help="SESSION or SESSION/CHECKPOINT")
@argument("--gpus", "-g", type=float, default=None, help="GPUs (default: the parent's)")
@argument("--memory", "-m", default=None, help="memory limit (default: the parent's)")
def _fork_args(line: str) -> None:
    """%nsml fork SESSION[/CHECKPOINT] [--gpus N] -- ARGS"""


@magic_arguments()
@argument("a", help="a session")
@argument("b", help="another session")
def _diff_args(line: str) -> None:
    """%nsml diff A B: code and argument differences."""


@magic_arguments()
@argument("session", help="user/dataset/N")
@argument("text", nargs="*", help="the new memo (omit to show it)")
def _memo_args(line: str) -> None:
    """%nsml memo SESSION [TEXT ...]"""


@magic_arguments()
@argument("source", help="SESSION or SESSION/CHECKPOINT")
@argument("dest", nargs="?", default=".", help="folder to write into (default: here)")
def _pull_args(line: str) -> None:
    """%nsml pull SESSION[/CHECKPOINT] [DIR]: download checkpoints."""


@magic_arguments()
@argument("session", help="a running session")
def _exec_args(line: str) -> None:
    """%nsml exec SESSION -- COMMAND ...: run a command in the session's container."""


@magic_arguments()
@argument("action", choices=["push", "ls", "info", "pull", "rm", "share"], help="what to do")
@argument("rest", nargs="*", help="the action's arguments (see `nsml dataset ACTION --help`)")
def _dataset_args(line: str) -> None:
    """%nsml dataset push NAME DIR | ls | info NAME[@k] | pull NAME[@k] DIR | rm | share"""


@magics_class
class NSMLMagics(Magics):
    """``%nsml VERB ...`` and ``%%nsml run ...``."""

    _client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            try:
                self._client = Client()
            except ConfigError as e:
                raise UsageError(str(e)) from None
        return self._client

    @line_cell_magic
    def nsml(self, line: str, cell: str | None = None) -> Any:
        """Run an NSML command: ``%nsml VERB [ARGS]`` (``%nsml help`` lists the verbs)."""
        words = line.strip().split(None, 1)
        if not words:
            raise UsageError(f"usage: %nsml VERB [ARGS]; verbs: {', '.join(sorted(VERBS))}")
        verb, rest = words[0], words[1] if len(words) > 1 else ""
        if verb in ("help", "-h", "--help"):
            print(self.help())
            return None
        fn = VERBS.get(verb)
        if fn is None:
            raise UsageError(f"%nsml {verb}: unknown verb; choose from {', '.join(sorted(VERBS))}")
        if cell is not None and verb != "run":
            raise UsageError(f"%%nsml {verb}: only '%%nsml run' takes a cell (the script)")
        argline, extra = split_dashdash(rest)
        try:
            return fn(self, argline, extra, cell)
        except NSMLError as e:
            raise UsageError(f"%nsml {verb}: {e.message}") from None
        except KeyboardInterrupt:
            return None

    @staticmethod
    def help() -> str:
        lines = ["%nsml VERB [ARGS]   (%%nsml run ... takes the cell as the script)", ""]
        for name, fn in sorted(VERBS.items()):
            lines.append(f"  {name:<8} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return "\n".join(lines)


# ---- verbs -----------------------------------------------------------------------------


def _gpustat(self: NSMLMagics, line: str, extra: list[str], cell: str | None) -> None:
    """the cluster's GPUs: per node, allocation and utilization."""
    args = parse_argstring(_gpustat_args, line)
    nodes = self.client.nodes()
    if args.json:
        print(json.dumps(nodes, indent=2, sort_keys=True))
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


VERBS: dict[str, Verb] = {
    "gpustat": _gpustat,
}
