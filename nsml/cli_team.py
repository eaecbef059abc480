"""``nsml team``: a team's members, admins and pool; a team admin (or an admin) adds and
removes members. The hub's groups stay the source of membership: the server changes the
group through the hub."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from . import _args
from ._fmt import print_json
from .client import Client


def team_lines(team: dict[str, Any]) -> list[str]:
    """A team for a person: who is in it, who administers it, its pool."""
    return [
        f"team {team['name']}: {', '.join(team['members']) or 'no members'}",
        f"team admins: {', '.join(team['admins']) or 'none'}",
        f"pool: {team['balance']:.3f} credits"
        + ("; it pays for " + (", ".join(team["billed"]) or "nobody yet") if team["pays"] else ""),
    ]


def _path(team: str, user: str | None = None) -> str:
    path = f"teams/{quote(team, safe='')}"
    return path + (f"/members/{quote(user, safe='')}" if user else "")


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    return _print(client.request("GET", _path(args.team)), args.json)


def cmd_add(client: Client, args: argparse.Namespace) -> int:
    return _print(client.request("PUT", _path(args.team, args.user)), args.json)


def cmd_remove(client: Client, args: argparse.Namespace) -> int:
    return _print(client.request("DELETE", _path(args.team, args.user)), args.json)


def _print(team: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print_json(team)
    else:
        print("\n".join(team_lines(team)))
    return 0


def add_team_verb(sub: argparse._SubParsersAction[_args.Parser]) -> None:
    """Add ``nsml team show|add|remove`` to the CLI's verbs."""
    p = sub.add_parser(
        "team",
        help="a team's members and admins; team admins add and remove members",
        description="Teams are JupyterHub groups: an admin or a team admin of TEAM adds or "
        "removes members (the server changes the hub's group); members read the team's "
        "sessions and datasets.",
    )
    verbs = p.add_subparsers(dest="team_verb", metavar="ACTION")
    verbs.required = True

    def action(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = verbs.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.add_argument("team", metavar="TEAM", help="the team (a JupyterHub group)")
        sp.set_defaults(fn=fn)
        return sp

    action("show", cmd_show, "members, team admins and pool of TEAM (admins, its team admins)")
    sp = action("add", cmd_add, "add USER to TEAM (an admin or a team admin of TEAM)")
    sp.add_argument("user", metavar="USER", help="a hub user name")
    sp = action("remove", cmd_remove, "remove USER from TEAM (an admin or a team admin of TEAM)")
    sp.add_argument("user", metavar="USER", help="a hub user name")
