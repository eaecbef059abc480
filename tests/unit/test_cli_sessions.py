"""The session verbs of the `nsml` CLI: every verb has --help, and scripts get --json where the
issue promises it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nsml.cli import build_parser, main

NSML = str(Path(sys.executable).parent / "nsml")
VERBS = (
    "run ps status logs stop rm fork resume diff memo model pull download exec getid events"
).split()


@pytest.mark.parametrize("verb", VERBS)
def test_every_session_verb_has_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: nsml {verb}") and len(out.splitlines()) > 3


@pytest.mark.parametrize("verb", ["ps", "status", "model", "logs", "run", "fork", "stop"])
def test_verbs_for_scripts_accept_json(verb: str) -> None:
    args = {"ps": [], "run": ["x.py"], "fork": ["a/_/1"]}.get(verb, ["a/_/1"])
    assert build_parser().parse_args([verb, *args, "--json"]).json is True


def test_script_arguments_go_after_a_double_dash(
    tmp_path: Path, nsml_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nsml_env.setenv("NSML_API_URL", "http://127.0.0.1:9/api/")
    nsml_env.setenv("NSML_TOKEN", "t")
    nsml_env.chdir(tmp_path)
    # The script's own options never reach the CLI's parser; the missing file is reported.
    assert main(["run", "--gpus", "1", "train.py", "--", "--gpus", "7", "--lr", "0.1"]) == 2
    assert "train.py is not a file" in capsys.readouterr().err
    (tmp_path / "train.py").write_text("print(1)\n")
    assert main(["run", "train.py", "--", "--lr", "0.1"]) == 2
    assert "Cannot reach the NSML API" in capsys.readouterr().err


def test_the_cli_says_how_to_configure_it(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([NSML, "ps"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "NSML_API_URL" in r.stderr
