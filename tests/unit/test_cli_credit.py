"""``nsml credit`` / ``%nsml credit`` against a stand-in API: the words, and the refusals."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nsml.cli import main
from nsml.cli_credit import credit_lines, time_left
from nsml_magics.magics import NSMLMagics
from tests.unit.fakeapi import FakeAPI

ACCOUNT: dict[str, Any] = {
    "account": "alice",
    "team": False,
    "pays": "user",
    "balance": 95.5,
    "balance_milli": 95500,
    "burn_rate_per_hour": 120.0,
    "hours_left": 0.7958,
    "history": [
        {
            "id": 2,
            "kind": "charge",
            "amount": -2.0,
            "amount_milli": -2000,
            "reason": "session session/mnist/3",
            "actor": "billing",
            "user": "alice",
            "session_id": 3,
            "server": None,
            "allocation": 7,
            "interval_start": "2026-12-01T09:00:00Z",
            "created": "2026-12-01T09:01:00.5Z",
        },
        {
            "id": 1,
            "kind": "grant",
            "amount": 97.5,
            "amount_milli": 97500,
            "reason": "welcome",
            "actor": "root",
            "user": None,
            "session_id": None,
            "server": None,
            "allocation": None,
            "interval_start": None,
            "created": "2026-12-01T08:00:00Z",
        },
    ],
    "usage_by_day": [],
}


@pytest.mark.parametrize(
    ("hours", "text"),
    [(None, "- (nothing running costs credits)"), (0.7958, "about 48 min"), (30.0, "about 30.0 h")],
)
def test_time_left_reads_as_words(hours: float | None, text: str) -> None:
    assert time_left(hours) == text


def test_the_account_shows_balance_burn_rate_time_left_and_history() -> None:
    lines = credit_lines(ACCOUNT)
    assert lines[:2] == [
        "alice: 95.500 credits",
        "burn rate now: 120.000 credits/hour; time left at that rate: about 48 min",
    ]
    table = "\n".join(lines[3:])
    assert "history (newest first):" in table
    assert "2026-12-01 09:01:00  charge  -2.000" in table
    assert "+97.500" in table and "welcome" in table


@pytest.fixture()
def api(nsml_env: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    routes = {
        "me": {"name": "alice"},
        "users/alice/credits": ACCOUNT,
        "users/bob/credits": (403, {"message": "This needs a hub admin.", "reason": "forbidden"}),
    }
    with FakeAPI.running(routes) as fake:
        nsml_env.setenv("NSML_API_URL", fake.url)
        nsml_env.setenv("NSML_TOKEN", "t")
        yield fake


def test_nsml_credit_shows_the_callers_account(
    api: FakeAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["credit"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("alice: 95.500 credits\n")
    assert ("GET", "/api/users/alice/credits?limit=10") in api.requests


def test_a_refusal_is_one_line_and_exit_2(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["credit", "--user", "bob"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "nsml: This needs a hub admin." and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ("credit --grant 5", "name whom, with --user or --team"),
        ("credit --grant 5 --user bob", "give a --reason"),
        ("credit --grant nan --user bob --reason x", "give a nonzero amount"),
        ("credit --user a --team b", "give --user or --team, not both"),
    ],
)
def test_bad_grants_are_refused_before_anything_is_sent(
    api: FakeAPI, capsys: pytest.CaptureFixture[str], argv: str, words: str
) -> None:
    assert main(argv.split()) == 2
    assert words in capsys.readouterr().err
    assert not any(method == "POST" for method, _ in api.requests)


def test_the_magic_has_the_verb(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    ip = InteractiveShell.instance()
    ip.register_magics(NSMLMagics(ip))
    ip.run_line_magic("nsml", "credit")
    assert "alice: 95.500 credits" in capsys.readouterr().out
    with pytest.raises(UsageError, match="This needs a hub admin"):
        ip.run_line_magic("nsml", "credit --user bob")
