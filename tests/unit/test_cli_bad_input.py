"""Odd arguments to every verb of the `nsml` CLI (and the same through `%nsml`): each is one line
on standard error naming what is wrong and what is valid, exit status 2, no traceback, and
nothing sent to the server. A closed output pipe, an unexpected error and a value JSON cannot
carry end the same quiet way."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nsml import Client, sessions
from nsml.cli import main
from nsml.client import NSMLError
from nsml.config import ClientConfig
from nsml_magics.magics import SHOWN, NSMLMagics, cli_verbs
from tests.unit.fakeapi import FakeAPI, gpu, node, session

NSML = str(Path(sys.executable).parent / "nsml")

# (arguments, a fragment the one-line message must hold)
BAD = [
    # numbers that are not finite, negative, out of range, or of the wrong kind
    ("run --gpus 1e400 train.py", "argument --gpus: '1e400' is not a finite number"),
    ("run --gpus inf train.py", "--gpus: 'inf' is not a finite number"),
    ("run --gpus -1 train.py", "--gpus: -1 is out of range"),
    ("run --gpus 257 train.py", "whole number of GPUs up to 256"),
    ("run --gpus 1.5 train.py", "--gpus: 1.5 is neither a fraction below 1 nor whole"),
    ("run --gpus two train.py", "--gpus: 'two' is not a number"),
    ("run --cpu nan train.py", "argument --cpu: 'nan' is not a finite number"),
    ("run --cpu 0 train.py", "--cpu: 0 is out of range; give a number of CPU cores from 0.001"),
    ("run --cpu -inf train.py", "--cpu: '-inf' is not a finite number"),
    ("run --memory -1G train.py", "argument --memory: -1G is negative"),
    ("run --memory 0 train.py", "--memory: 0 is less than 1 MiB"),
    ("run --memory 1e3G train.py", "--memory: '1e3G' is not a memory size"),
    ("run --memory 99999999999999999999999T train.py", "is more than 1024T"),
    ("run --memory lots train.py", "give a size such as 8G, 512M"),
    ("fork alice/_/1 --gpus nan", "--gpus: 'nan' is not a finite number"),
    ("fork alice/_/1 --cpu 5000", "--cpu: 5000 is out of range"),
    ("fork alice/_/1 --memory -512M", "--memory: -512M is negative"),
    ("ps --limit -5", "argument --limit: -5 is out of range; give a whole number from 1 to"),
    ("ps --limit 0", "--limit: 0 is out of range"),
    ("ps --limit 1e400", "--limit: '1e400' is not a whole number"),
    ("ps --limit 99999999999999999999", "--limit: 99999999999999999999 is out of range"),
    ("logs alice/_/1 -n -5", "argument -n/--tail: -5 is out of range; give a number of lines"),
    ("logs alice/_/1 -n nan", "-n/--tail: 'nan' is not a whole number"),
    ("logs alice/_/1 --tail 1.5", "-n/--tail: '1.5' is not a whole number"),
    ("exec alice/_/1 --timeout -1 -- ls", "--timeout: -1 is out of range; give seconds above 0"),
    ("exec alice/_/1 --timeout 0 -- ls", "--timeout: 0 is out of range"),
    ("exec alice/_/1 --timeout inf -- ls", "--timeout: 'inf' is not a finite number"),
    ("exec alice/_/1 --timeout 601 -- ls", "up to 600"),
    ("events --since -1", "argument --since: -1 is out of range; give an event id from 0"),
    ("events --since 1e3", "--since: '1e3' is not a whole number"),
    ("events --since 99999999999999999999", "--since: 99999999999999999999 is out of range"),
    ("dataset push mnist ./data --workers 0", "argument --workers: 0 is out of range"),
    ("dataset push mnist ./data --workers -1", "--workers: -1 is out of range"),
    ("dataset pull mnist ./copy --workers 1e400", "--workers: '1e400' is not a whole number"),
    ("dataset gc --older-than nan", "argument --older-than: 'nan' is not a finite number"),
    ("dataset gc --older-than -1", "--older-than: -1 is out of range; give seconds from 0"),
    # names, choices, missing and unknown arguments
    ("status not-a-session", "'not-a-session' is not a session name"),
    ("status alice/_/99999999999999999999", "N is a whole number from 1 to"),
    ("stop alice/mnist/three", "is not a session name"),
    ("resume a/b/c/d/e", "is not a session name"),
    ("model alice/_/0", "is not a session name"),
    ("rm", "nsml rm: the following arguments are required: SESSION"),
    ("diff alice/_/1", "nsml diff: the following arguments are required: b"),
    ("memo alice/_/1", "nsml memo: the following arguments are required: text"),
    ("pull", "nsml pull: the following arguments are required: session"),
    ("download", "nsml download: the following arguments are required: session"),
    ("exec alice/_/1", "give the command after --"),
    ("getid --dataset", "nsml getid: argument --dataset: expected one argument"),
    ("run", "nsml run: the following arguments are required: script"),
    ("run --gpus", "argument --gpus: expected one argument"),
    ("ps --state sideways", "argument --state: invalid choice: 'sideways'"),
    ("ps --bogus", "nsml ps: unrecognized arguments: --bogus"),
    ("nodes --state sideways", "nsml nodes: argument --state: invalid choice"),
    ("nodes --drain", "argument --drain: expected one argument"),
    ("gpustat --state sideways", "nsml gpustat: argument --state: invalid choice"),
    ("health --json=yes", "ignored explicit argument 'yes'"),
    ("whoami somebody", "nsml whoami: unrecognized arguments: somebody"),
    ("credit --limit 5000", "nsml credit: argument --limit: 5000 is out of range"),
    ("credit --grant 1e400 --user bob --reason x", "give a nonzero amount from 0.001 to 1e9"),
    ("dataset", "the following arguments are required: ACTION"),
    ("dataset bogus", "argument ACTION: invalid choice: 'bogus'"),
    ("dataset ls --scope galaxy", "nsml dataset ls: argument --scope: invalid choice"),
    ("dataset info", "nsml dataset info: the following arguments are required: NAME[@k]"),
    ("dataset rm", "nsml dataset rm: the following arguments are required"),
    ("dataset share mnist", "one of the arguments --team --public --private is required"),
    ("plot", "name the sessions to compare"),
    ("gpumonitor", "nsml gpumonitor: the following arguments are required: session"),
    ("gpumonitor alice/_/x", "'alice/_/x' is not a session name"),
    ("plot alice/_/1 --smooth 1", "argument --smooth: 1 is out of range: use 0 (none) to 0.999"),
    ("plot alice/_/1 --smooth x", "--smooth: 'x' is not a number"),
    ("plot --last 0", "argument --last: 0 is out of range; give a number of sessions from 1"),
    ("plot alice/_/1 --x date", "argument --x: invalid choice: 'date'"),
    ("plot alice/_/1 --max-points 1", "--max-points: 1 is out of range"),
    ("plot alice/_/1 --metric", "argument --metric: expected one argument"),
    ("plot bad-name", "'bad-name' is not a session name"),
    ("submit alice/mnist", "'alice/mnist' is not a session USER/DATASET/N or one of its"),
    ("submit alice/mnist/1/c/d", "is not a session USER/DATASET/N"),
    ("submit", "nsml submit: the following arguments are required: session"),
    ("submissions --bogus", "nsml submissions: unrecognized arguments: --bogus"),
    ("leaderboard", "nsml leaderboard: the following arguments are required: dataset"),
    ("dataset board mnist --daily-limit -1", "--daily-limit: -1 is out of range; give a number"),
    ("dataset board mnist --gpus two", "argument --gpus: 'two' is not a whole number"),
    ("dataset board mnist --timeout 5", "--timeout: 5 is out of range; give a number of seconds"),
    ("dataset board mnist --close --reopen", "not allowed with argument --close"),
    ("dataset push mnist ./data --test-inputs in", "--test-inputs and --test-labels go together"),
    ("team add vision", "nsml team add: the following arguments are required: USER"),
    ("team bogus vision", "argument ACTION: invalid choice: 'bogus'"),
    ("run --team vision --private train.py", "give --team or --private, not both"),
    ("run --public --private train.py", "argument --private: not allowed with argument --public"),
    ("bogus", "argument VERB: invalid choice: 'bogus'"),
    ("", "the following arguments are required: VERB"),
]
CASES = [pytest.param(argv, said, id=argv or "(nothing)") for argv, said in BAD]


def test_the_table_tries_every_verb_and_every_dataset_action() -> None:
    verbs = set(cli_verbs())
    tried = {argv.split()[0] for argv, _ in BAD if argv}
    assert verbs <= tried, f"verbs without an odd-argument case: {sorted(verbs - tried)}"
    actions = {"push", "ls", "info", "pull", "rm", "share", "gc", "board"}
    tried_actions = {argv.split()[1] for argv, _ in BAD if argv.startswith("dataset ")}
    assert actions <= tried_actions


@pytest.fixture()
def api(nsml_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAPI]:
    """A fake API that answers everything; the tests assert it was never asked."""
    with FakeAPI.running({"me": {"name": "alice"}}) as fake:
        nsml_env.setenv("NSML_API_URL", fake.url)
        nsml_env.setenv("NSML_TOKEN", "t")
        nsml_env.chdir(tmp_path)
        (tmp_path / "train.py").write_text("print(1)\n")
        yield fake


def split(argv: str) -> list[str]:
    return argv.split()


@pytest.mark.parametrize(("argv", "said"), CASES)
def test_an_odd_argument_is_one_line_exit_2_and_nothing_sent(
    argv: str, said: str, api: FakeAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(split(argv))
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert said in err, err
    assert "Traceback" not in err
    assert api.requests == []


@pytest.mark.parametrize(
    "argv",
    ["run --gpus 1e400 train.py", "run --cpu nan train.py", "logs -n -5 alice/_/1",
     "run --memory -1G train.py"],
)  # fmt: skip
def test_the_quoted_cases_in_a_real_process(argv: str, api: FakeAPI, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NSML_API_URL": api.url}
    env["NSML_TOKEN"] = "t"
    r = subprocess.run(
        [NSML, *split(argv)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "Cannot reach" not in r.stderr and "expected one argument" not in r.stderr
    assert api.requests == []


@pytest.fixture()
def magics(ip: InteractiveShell, api: FakeAPI) -> NSMLMagics:
    m = ip.magics_manager.registry["NSMLMagics"]
    assert isinstance(m, NSMLMagics)
    m._client = None  # configured from this test's environment
    return m


@pytest.fixture(scope="module")
def ip() -> InteractiveShell:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nsml_magics")
    return shell


@pytest.mark.parametrize(
    ("argv", "said"), [c for c in CASES if c.values[0] and not str(c.values[0]).startswith("bogus")]
)
def test_the_magics_refuse_the_same_arguments_with_a_usage_error(
    argv: str, said: str, ip: InteractiveShell, magics: NSMLMagics, api: FakeAPI
) -> None:
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("nsml", argv)
    message = str(e.value)
    assert "\n" not in message and said.replace("nsml ", "%nsml ") in message, message
    assert api.requests == []


def test_the_magics_and_the_cli_have_the_same_verbs(ip: InteractiveShell) -> None:
    m = ip.magics_manager.registry["NSMLMagics"]
    assert set(m.verbs()) == set(cli_verbs())
    assert set(SHOWN) <= set(cli_verbs()), "a verb shown in notebooks must be a CLI verb"
    assert {"gpustat", "run", "ps", "logs", "dataset"} <= set(m.verbs())


# ---- what the process does around the verbs ------------------------------------------------


def test_a_closed_output_pipe_ends_quietly(nsml_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rows = [session(n) for n in range(1, 3001)]
    with FakeAPI.running({"sessions": {"sessions": rows}}) as fake:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NSML_API_URL": fake.url}
        env["NSML_TOKEN"] = "t"
        for argv in (["ps"], ["ps", "--json"]):
            # `nsml ps | head -1`: the reader goes away after one line.
            r = subprocess.run(
                ["sh", "-c", f"{NSML} {' '.join(argv)} | head -1"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
            assert r.stderr == "", r.stderr
            proc = subprocess.Popen(
                [NSML, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.readline()
            proc.stdout.close()
            err = proc.stderr.read().decode()
            assert proc.wait(60) in (0, 141)
            assert err == "", err


def test_an_unexpected_error_is_one_line_and_the_traceback_only_with_nsml_debug(
    nsml_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeAPI.running({"me": ["not", "an", "object"]}) as fake:
        nsml_env.setenv("NSML_API_URL", fake.url)
        nsml_env.setenv("NSML_TOKEN", "t")
        assert main(["whoami"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("nsml: unexpected error: TypeError")
        assert "NSML_DEBUG=1" in err and "Traceback" not in err
        nsml_env.setenv("NSML_DEBUG", "1")
        assert main(["whoami"]) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.splitlines()[-1].startswith("nsml: unexpected error: TypeError")


@pytest.mark.parametrize(
    "body",
    [{"gpus": float("nan")}, {"args": [1.0, float("inf")]}, {"a": {"b": -float("inf")}}],
)
def test_the_client_never_sends_a_value_json_cannot_carry(body: dict[str, object]) -> None:
    with FakeAPI.running({"sessions": {}}) as fake:
        client = Client(ClientConfig(fake.url, "t", "test"))
        with pytest.raises(NSMLError, match="is not a finite number"):
            client.request("POST", "sessions", body)
        with pytest.raises(NSMLError, match="is not a finite number"):
            client.request("GET", "sessions", limit=float("nan"))
        assert fake.requests == []


def test_a_session_with_a_non_finite_resource_is_refused_before_its_code_is_uploaded(
    tmp_path: Path,
) -> None:
    (tmp_path / "train.py").write_text("print(1)\n")
    with FakeAPI.running({"code": {"digest": "0" * 64, "files": 1, "bytes": 9}}) as fake:
        client = Client(ClientConfig(fake.url, "t", "test"))
        with pytest.raises(NSMLError, match="gpus is not a finite number"):
            sessions.run(client, "train.py", folder=tmp_path, gpus=float("inf"))
        assert fake.requests == []


def test_gpustat_is_a_cli_verb_that_shows_index_0_utilization_and_virtual_gpus(
    nsml_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = [
        node("real", "nvml", [gpu(0, 37, used=1200, allocated=1000), gpu(1, 0)]),
        node("trial", "virtual", [gpu(0, None, allocated=500)]),
        node("cpu-only", "none", []),
    ]
    with FakeAPI.running({"nodes": {"nodes": nodes}}) as fake:
        nsml_env.setenv("NSML_API_URL", fake.url)
        nsml_env.setenv("NSML_TOKEN", "t")
        assert main(["gpustat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "GPU", "MODEL", "ALLOCATED", "MEMORY", "UTIL"]
    assert lines[1].split() == [
        "real",
        "up",
        "0",
        "NVIDIA",
        "A100",
        "1",
        "1200/40960",
        "MiB",
        "37%",
    ]
    assert lines[2].split()[2] == "1" and lines[2].split()[-1] == "0%"
    virtual = lines[3].split()
    assert virtual[:3] == ["trial", "up", "0"] and "(virtual)" in lines[3]
    assert virtual[-1] == "-" and "0.5" in virtual
    assert lines[4].split()[:2] == ["cpu-only", "up"] and "no GPUs" in lines[4]
