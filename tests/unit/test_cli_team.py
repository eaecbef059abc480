"""``nsml team`` / ``%nsml team`` against a stand-in API: what is sent, the words, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nsml.cli import main
from nsml.cli_team import team_lines
from nsml_magics.magics import NSMLMagics
from tests.unit.fakeapi import FakeAPI

TEAM: dict[str, Any] = {
    "name": "vision",
    "pays": True,
    "balance": 250.0,
    "balance_milli": 250000,
    "admins": ["vic"],
    "members": ["mia", "vic"],
    "billed": ["mia"],
}


def test_a_team_reads_as_members_admins_and_pool() -> None:
    assert team_lines(TEAM) == [
        "team vision: mia, vic",
        "team admins: vic",
        "pool: 250.000 credits; it pays for mia",
    ]


@pytest.fixture()
def api(nsml_env: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    routes = {
        "teams/vision": TEAM,
        "teams/vision/members/bob": {**TEAM, "members": ["bob", "mia", "vic"]},
        "teams/vision/members/eve": (
            403,
            {
                "message": "Only an admin or a team admin of team vision may change its members.",
                "reason": "forbidden",
            },
        ),
    }
    with FakeAPI.running(routes) as fake:
        nsml_env.setenv("NSML_API_URL", fake.url)
        nsml_env.setenv("NSML_TOKEN", "t")
        yield fake


def test_nsml_team_add_and_remove_call_the_members_route(
    api: FakeAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["team", "add", "vision", "bob"]) == 0
    assert capsys.readouterr().out.startswith("team vision: bob, mia, vic\n")
    assert main(["team", "remove", "vision", "bob"]) == 0
    assert ("PUT", "/api/teams/vision/members/bob") in api.requests
    assert ("DELETE", "/api/teams/vision/members/bob") in api.requests


def test_a_refusal_is_one_line_and_exit_2(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["team", "add", "vision", "eve"]) == 2
    err = capsys.readouterr().err
    assert err == "nsml: Only an admin or a team admin of team vision may change its members.\n"


def test_a_missing_user_is_a_usage_error_before_anything_is_sent(
    api: FakeAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["team", "add", "vision"]) == 2
    assert "USER" in capsys.readouterr().err
    assert api.requests == []


def test_the_magic_has_the_verb(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    ip = InteractiveShell.instance()
    ip.register_magics(NSMLMagics(ip))
    ip.run_line_magic("nsml", "team show vision")
    assert "team admins: vic" in capsys.readouterr().out
    with pytest.raises(UsageError, match="Only an admin or a team admin"):
        ip.run_line_magic("nsml", "team add vision eve")


def test_ps_teams_asks_for_the_team_sessions_from_the_cli_and_the_magic(
    nsml_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.fakeapi import session

    rows = [session(1), {**session(4, user="vic"), "visibility": "team", "team": "vision"}]
    with FakeAPI.running({"sessions": {"sessions": rows}}) as fake:
        nsml_env.setenv("NSML_API_URL", fake.url)
        nsml_env.setenv("NSML_TOKEN", "t")
        assert main(["ps", "--teams"]) == 0
        assert "vic/_/4" in capsys.readouterr().out
        ip = InteractiveShell.instance()
        ip.register_magics(NSMLMagics(ip))
        ip.run_line_magic("nsml", "ps --teams")
        assert "vic/_/4" in capsys.readouterr().out
        assert main(["ps"]) == 0
    asked = [path for method, path in fake.requests if path.startswith("/api/sessions")]
    assert asked == ["/api/sessions?teams=1", "/api/sessions?teams=1", "/api/sessions"]
