"""The ``nsml credit`` verb (and ``%nsml credit``): balance, burn rate now, time left at that
rate, and the ledger; admins also see other users' and teams' credits and grant credits."""

from __future__ import annotations

import argparse
import math
from typing import Any
from urllib.parse import quote

from . import _args
from ._fmt import print_json, text_table
from .client import Client

HISTORY_COLUMNS = [
    ("when", "WHEN"),
    ("kind", "KIND"),
    ("amount", "CREDITS"),
    ("what", "FOR"),
    ("actor", "BY"),
]


def _finite_amount(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of credits") from None
    if not math.isfinite(value) or abs(value) > 1e9 or round(value * 1000) == 0:
        raise argparse.ArgumentTypeError(
            f"{raw!r}: give a nonzero amount from 0.001 to 1e9 credits (negative deducts)"
        )
    return value


def time_left(hours: float | None) -> str:
    """``about 2.5 h`` / ``about 12 min`` / ``-`` (nothing burns)."""
    if hours is None:
        return "- (nothing running costs credits)"
    if hours < 2:
        return f"about {round(hours * 60)} min"
    return f"about {hours:.1f} h"


def credit_lines(acct: dict[str, Any]) -> list[str]:
    """The human-readable account (pure; tested by exact text)."""
    who = f"team {acct['account']}" if acct["team"] else acct["account"]
    lines = [f"{who}: {acct['balance']:.3f} credits"]
    if acct.get("pays", "user") != "user":
        lines.append(f"paid by: {acct['pays'].replace(':', ' ', 1)}")
    lines.append(
        f"burn rate now: {acct['burn_rate_per_hour']:.3f} credits/hour; time left at that "
        f"rate: {time_left(acct.get('hours_left'))}"
    )
    rows = [
        {
            "when": e["created"].replace("T", " ")[:19],
            "kind": e["kind"],
            "amount": f"{e['amount']:+.3f}",
            "what": e["reason"],
            "actor": e["actor"],
        }
        for e in acct.get("history", [])
    ]
    if rows:
        lines += ["", "history (newest first):", text_table(rows, HISTORY_COLUMNS)]
    else:
        lines.append("no ledger entries yet")
    return lines


def cmd_credit(client: Client, args: argparse.Namespace) -> int:
    if args.team and args.user:
        raise _args.UsageProblem("nsml credit: give --user or --team, not both")
    if args.grant is not None:
        if not (args.user or args.team):
            raise _args.UsageProblem("nsml credit --grant: name whom, with --user or --team")
        if not args.reason:
            raise _args.UsageProblem("nsml credit --grant: give a --reason (it goes in the ledger)")
        kind, name = ("teams", args.team) if args.team else ("users", args.user)
        entry = client.request(
            "POST",
            f"{kind}/{quote(name, safe='')}/credits",
            {"amount": args.grant, "reason": args.reason},
        )
        if args.json:
            print_json(entry)
        else:
            print(f"{name}: {entry['amount']:+.3f} credits ({entry['reason']})")
        return 0
    if args.team:
        path = f"teams/{quote(args.team, safe='')}/credits"
    else:
        name = args.user or client.me()["name"]
        path = f"users/{quote(name, safe='')}/credits"
    acct = client.request("GET", path, limit=args.limit)
    if args.json:
        print_json(acct)
    else:
        print("\n".join(credit_lines(acct)))
    return 0


def add_credit_verb(sub: Any) -> None:
    help = "credits: balance, burn rate now, time left at that rate, history; admins grant"
    sp = sub.add_parser("credit", help=help, description=help)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--user", metavar="NAME", help="another user's credits (admin)")
    sp.add_argument("--team", metavar="TEAM", help="a team pool's credits (its members, admins)")
    sp.add_argument(
        "--limit",
        type=_args.integer(0, 1000, "a number of rows"),
        default=10,
        help="ledger rows shown, newest first (default 10)",
    )
    sp.add_argument(
        "--grant",
        type=_finite_amount,
        metavar="AMOUNT",
        help="give AMOUNT credits to --user or --team (admin; negative deducts)",
    )
    sp.add_argument("--reason", metavar="TEXT", help="why, for --grant")
    sp.set_defaults(fn=cmd_credit)
