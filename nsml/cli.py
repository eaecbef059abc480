"""``nsml``: the command-line client of the NSML platform."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ._fmt import print_json
from .cli_dataset import add_dataset_verb
from .cli_session import add_session_verbs
from .client import Client, NSMLError
from .config import ConfigError, resolve
from .snapshot import SnapshotError


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
    models: dict[str, int] = {}
    for g in gpus:
        models[g["model"]] = models.get(g["model"], 0) + 1
    virtual = " (virtual: no real GPU)" if any(g.get("virtual") for g in gpus) else ""
    return ", ".join(f"{n}x {m}" for m, n in models.items()) + virtual


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nsml",
        description="The NSML platform's client. The API URL comes from NSML_API_URL and the "
        "token from NSML_TOKEN (inside a notebook server, from the hub's environment).",
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
    add_session_verbs(sub)
    add_dataset_verb(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nsml``. Arguments after ``--`` are the script's (run, fork, exec)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    args.rest = rest
    try:
        config = resolve(require_token=not getattr(args, "anonymous", False))
        return int(args.fn(Client(config), args))
    except (NSMLError, ConfigError, SnapshotError, ValueError) as e:
        print(f"nsml: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
