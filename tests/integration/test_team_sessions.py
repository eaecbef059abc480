"""Team sessions and team membership through a real hub: the hub's groups say who is in a
team; members read a team session as a public one, a team admin stops it and adds members
(the service changes the hub's group), plain members and outsiders are refused."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_hub import assert_json_error
from tests.integration.test_sessions import TRAIN_PY, cli_for, logs, wait_state

pytestmark = [pytest.mark.hub, pytest.mark.docker]


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY)
    return folder


@pytest.fixture()
def team(hub: HubProcess) -> Iterator[str]:
    """A hub group made an NSML team; removed from the hub afterwards."""
    name = f"tm{secrets.token_hex(4)}"
    hub.admin("POST", f"/groups/{name}").raise_for_status()
    r = hub.nsml("PUT", f"teams/{name}", hub.user_token("admin"), json={"pays": False})
    assert r.status_code == 200, r.text
    yield name
    hub.admin("DELETE", f"/groups/{name}")


def join(hub: HubProcess, team: str, *users: str) -> None:
    hub.admin("POST", f"/groups/{team}/users", json={"users": list(users)}).raise_for_status()


def test_members_read_a_team_session_a_team_admin_stops_it_outsiders_get_nothing(
    hub: HubProcess, project: Path, team: str
) -> None:
    tag = secrets.token_hex(3)
    owner, member, lead, outsider = (f"tm-{w}-{tag}" for w in ("own", "mem", "lead", "out"))
    for u in (owner, member, lead, outsider):
        hub.user_token(u)
    join(hub, team, owner, member, lead)
    admin = hub.user_token("admin")
    r = hub.nsml("PUT", f"teams/{team}/admins/{lead}", admin, json={"admin": True})
    assert r.status_code == 200, r.text
    # Tokens made after the group changed (the service caches a token's user for a minute).
    tokens = {u: hub.user_token(u) for u in (owner, member, lead, outsider)}

    nsml = cli_for(hub, tokens[owner], project)
    started = json.loads(
        nsml(
            "run", "train.py", "--team", team, "--json", "--", "--epochs", "1000", "--sleep", "0.1"
        ).stdout
    )
    name = started["name"]
    assert (started["visibility"], started["team"]) == ("team", team)
    wait_state(nsml, name, ("running",))

    # A member reads it as a public one: status, logs, events, metrics, checkpoints, ps --teams.
    as_member = cli_for(hub, tokens[member], project)
    st = json.loads(as_member("status", name, "--json").stdout)
    assert (st["state"], st["team"]) == ("running", team)
    assert st["credit_rate"] is not None and st["credits_used"] is not None
    wait_for(lambda: "first line of user code" in logs(as_member, name), what="its output")
    for path in ("events", "metrics", "checkpoints"):
        r = hub.nsml("GET", f"sessions/{name}/{path}", tokens[member])
        assert r.status_code == 200, (path, r.text)
    # ... forks it (the child is the member's own, private) ...
    forked = hub.nsml(
        "POST", f"sessions/{name}/fork", tokens[member], json={"args": ["--epochs", "1"]}
    )
    assert forked.status_code == 201, forked.text
    child = forked.json()
    assert (child["user"], child["visibility"], child["parent"]) == (member, "private", name)
    as_member("stop", child["name"])
    listed = json.loads(as_member("ps", "--teams", "--json").stdout)
    assert name in [s["name"] for s in listed]
    assert name not in [s["name"] for s in json.loads(as_member("ps", "--json").stdout)]
    # ... and may not stop it (nor change or remove it).
    refused = as_member("stop", name, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"nsml: Only {owner}, an admin or a team admin of team {team} may stop session {name}."
    )
    assert_json_error(
        hub.nsml("PATCH", f"sessions/{name}", tokens[member], json={"memo": "x"}), 403, "forbidden"
    )

    # Outsiders are answered as for a private session; the team is not theirs to name.
    for method, path, body in (
        ("GET", f"sessions/{name}", None),
        ("GET", f"sessions/{name}/logs", None),
        ("POST", f"sessions/{name}/stop", None),
        ("POST", f"sessions/{name}/fork", {}),
    ):
        r = hub.nsml(method, path, tokens[outsider], json=body)
        assert_json_error(r, 403, "forbidden")
    listed = hub.nsml("GET", "sessions?teams=1", tokens[outsider]).json()["sessions"]
    assert name not in [s["name"] for s in listed]
    wrong = cli_for(hub, tokens[outsider], project)("run", "train.py", "--team", team, check=False)
    assert wrong.returncode == 2
    assert f"You are not a member of team '{team}'" in wrong.stderr

    # The team admin stops it (what the sidebar offers them: GET me names the team).
    assert hub.nsml("GET", "me", tokens[lead]).json()["team_admin_of"] == [team]
    assert hub.nsml("GET", "me", tokens[member]).json()["team_admin_of"] == []
    r = hub.nsml("POST", f"sessions/{name}/stop", tokens[lead])
    assert r.status_code == 202, r.text
    st = wait_state(nsml, name)
    assert st["state"] == "stopped"


def test_a_team_admin_adds_a_member_through_the_hub_a_plain_member_cannot(
    hub: HubProcess, project: Path, team: str
) -> None:
    tag = secrets.token_hex(3)
    owner, lead, member, newcomer = (f"tm-{w}-{tag}" for w in ("own", "lead", "mem", "new"))
    for u in (owner, lead, member, newcomer):
        hub.user_token(u)
    join(hub, team, owner, lead, member)
    admin = hub.user_token("admin")
    assert hub.nsml("PUT", f"teams/{team}/admins/{lead}", admin, json={"admin": True}).ok
    tokens = {u: hub.user_token(u) for u in (owner, lead, member)}

    # The owner's billing team pays: without --team, their session is that team's.
    assert hub.nsml("GET", "me", tokens[owner]).ok  # the service sees their groups
    assert hub.nsml("PUT", f"teams/{team}", admin, json={"pays": True}).ok
    r = hub.nsml("POST", f"teams/{team}/credits", admin, json={"amount": 100, "reason": "test"})
    assert r.status_code == 201, r.text
    r = hub.nsml("PUT", f"users/{owner}/team", tokens[lead], json={"team": team})
    assert r.status_code == 200, r.text
    nsml = cli_for(hub, tokens[owner], project)
    started = json.loads(
        nsml("run", "train.py", "--json", "--", "--epochs", "1000", "--sleep", "0.1").stdout
    )
    name = started["name"]
    assert (started["visibility"], started["team"]) == ("team", team)

    # A plain member and an outsider may not change who is in the team.
    for who in (tokens[member], hub.user_token(newcomer)):
        r = hub.nsml("PUT", f"teams/{team}/members/{newcomer}", who)
        body = assert_json_error(r, 403, "forbidden")
        assert body["message"] == (
            f"Only an admin or a team admin of team {team} may change its members."
        )
    assert newcomer not in hub.admin("GET", f"/groups/{team}").json()["users"]

    # The team admin adds the newcomer (the CLI), the hub's group shows them ...
    added = cli_for(hub, tokens[lead], project)("team", "add", team, newcomer, "--json")
    assert newcomer in json.loads(added.stdout)["members"]
    assert newcomer in hub.admin("GET", f"/groups/{team}").json()["users"]
    # ... and they read the team session (a token made after the change).
    fresh = hub.user_token(newcomer)
    r = hub.nsml("GET", f"sessions/{name}", fresh)
    assert r.status_code == 200, r.text
    assert r.json()["team"] == team
    # Removing them through the API takes them out of the hub's group again.
    r = hub.nsml("DELETE", f"teams/{team}/members/{newcomer}", tokens[lead])
    assert r.status_code == 200, r.text
    assert newcomer not in r.json()["members"]
    assert newcomer not in hub.admin("GET", f"/groups/{team}").json()["users"]
    assert_json_error(
        hub.nsml("GET", f"sessions/{name}", hub.user_token(newcomer)), 403, "forbidden"
    )
    # An unknown user is the hub's 404, as JSON.
    r = hub.nsml("PUT", f"teams/{team}/members/nobody-{tag}", tokens[lead])
    assert_json_error(r, 404, "not_found")
    nsml("stop", name, "--wait")
