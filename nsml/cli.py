"""``nsml``: the command-line client of the NSML platform.

Every verb is declared once, here and in :mod:`nsml.cli_session` / :mod:`nsml.cli_dataset`;
the ``%nsml`` magics are built from the same parser. Results go to standard output; notes,
progress and errors to standard error. A mistake or a refusal is one line on standard error
and exit status 2; nothing is sent to the server for an argument it would refuse.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ._args import Parser, UsageProblem
from ._fmt import gpu_rows, print_json, text_table
from .cli_board import add_board_verbs
from .cli_credit import add_credit_verb
from .cli_dataset import add_dataset_verb
from .cli_plot import add_plot_verb
from .cli_session import add_session_verbs
from .cli_team import add_team_verb
from .client import Client, NSMLError
from .config import ConfigError, resolve
from .snapshot import SnapshotError

#: Exit status of a command whose output pipe was closed early (``nsml ps | head``): what a
#: shell reports for a program ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    h = client.health()
    if args.json:
        print_json(h)
    else:
        print(
            f"{h['status']} (version {h['version']}, database {h['database']}, "
            f"backend {h.get('backend')})"
        )
    return 0 if h["status"] == "ok" else 1


def cmd_whoami(client: Client, args: argparse.Namespace) -> int:
    me = client.me()
    if args.json:
        print_json(me)
    else:
        print(f"{me['name']} ({me['permission']}), {me['credits']:.2f} credits")
    return 0


def _gpu_summary(node: dict[str, Any]) -> str:
    gpus = node["gpus"]
    if not gpus:
        probe = node.get("gpu_probe") or {}
        return "no GPUs" + (f" ({probe.get('reason')})" if probe.get("reason") else "")
    virtual = (node.get("gpu_probe") or {}).get("kind") == "virtual"
    models: dict[str, int] = {}
    for g in gpus:
        name = str(g["model"]) + (" (virtual)" if virtual or g.get("virtual") else "")
        models[name] = models.get(name, 0) + 1
    return ", ".join(f"{n}x {m}" for m, n in models.items())


def cmd_nodes(client: Client, args: argparse.Namespace) -> int:
    if args.drain or args.undrain:
        node = client.set_node_state(args.drain or args.undrain, "draining" if args.drain else "up")
        print(f"{node['name']}: {node['state']}")
        return 0
    nodes = client.nodes(state=args.state)
    if args.json:
        print_json(nodes)
        return 0
    print(f"{'NODE':<24} {'STATE':<9} {'BACKEND':<8} {'CPU':>6} {'MEM GiB':>8}  GPUS")
    for n in nodes:
        print(
            f"{n['name']:<24} {n['state']:<9} {n['backend']:<8} {n['cpu_milli'] / 1000:>6g} "
            f"{n['memory_mib'] / 1024:>8.1f}  {_gpu_summary(n)}"
        )
    return 0


GPUSTAT_COLUMNS = [
    ("node", "NODE"),
    ("state", "STATE"),
    ("gpu", "GPU"),
    ("model", "MODEL"),
    ("allocated", "ALLOCATED"),
    ("memory", "MEMORY"),
    ("util", "UTIL"),
]


def cmd_gpustat(client: Client, args: argparse.Namespace) -> int:
    nodes = client.nodes(state=args.state)
    if args.json:
        print_json(nodes)
        return 0
    print(text_table(gpu_rows(nodes), GPUSTAT_COLUMNS))
    return 0


def build_parser() -> Parser:
    """The ``nsml`` parser: one sub-parser per verb (the magics use the same ones)."""
    p = Parser(
        prog="nsml",
        description="The NSML platform's client. The API URL comes from NSML_API_URL and the "
        "token from NSML_TOKEN (inside a notebook server, from the hub's environment). "
        "NSML_DEBUG=1 shows the traceback of an unexpected error.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def verb(
        name: str, fn: Callable[[Client, argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=fn)
        return sp

    verb("health", cmd_health, "is the NSML server up? (no token needed)").set_defaults(
        anonymous=True
    )
    verb("whoami", cmd_whoami, "who the token belongs to: permission level and credits")
    sp = verb("nodes", cmd_nodes, "list the cluster's nodes and GPUs; drain a node (admin)")
    sp.add_argument("--state", choices=["up", "draining", "down"], help="only nodes in this state")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--drain", metavar="NODE", help="stop placing new work on NODE (admin)")
    g.add_argument("--undrain", metavar="NODE", help="let NODE receive work again (admin)")
    sp = verb(
        "gpustat",
        cmd_gpustat,
        "the cluster's GPUs, one per line: allocation, memory and utilization (virtual GPUs "
        "are marked)",
    )
    sp.add_argument("--state", choices=["up", "draining", "down"], help="only nodes in this state")
    add_session_verbs(sub)
    add_plot_verb(sub)
    add_dataset_verb(sub)
    add_board_verbs(sub)
    add_credit_verb(sub)
    add_team_verb(sub)
    return p


def one_line(text: object) -> str:
    """*text* on one line (a message may carry newlines from a server or a library); other
    spacing is kept (a file name may hold two spaces)."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text).strip())


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush into a
    closed pipe does not print an error of its own."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nsml``. Arguments after ``--`` are the script's (run, fork, exec).

    Exit status: the verb's (0 on success), 2 for a mistake, a refusal or an unexpected error
    (one line on standard error; ``NSML_DEBUG=1`` adds the traceback), 130 when interrupted,
    141 when the reader of standard output went away (``nsml ps | head``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1 :]
    try:
        try:
            args = build_parser().parse_args(argv)
        except UsageProblem as e:
            print(one_line(e), file=sys.stderr)
            return 2
        args.rest = rest
        config = resolve(require_token=not getattr(args, "anonymous", False))
        code = int(args.fn(Client(config), args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except (NSMLError, ConfigError, SnapshotError, UsageProblem, ValueError) as e:
        print(f"nsml: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("NSML_DEBUG"):
            traceback.print_exc()
        print(
            f"nsml: unexpected error: {e.__class__.__name__}: {one_line(e)} (NSML_DEBUG=1 "
            "shows the traceback; please report it)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
