"""The %nsml magics in a real IPython shell: parsing, usage errors, the live status line."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nsml_magics.magics import split_dashdash
from nsml_magics.status import StatusLine, render_status


@pytest.fixture(scope="module")
def ip() -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nsml_magics")
    yield shell


def test_the_extension_registers_a_line_and_a_cell_magic(ip: InteractiveShell) -> None:
    assert "nsml" in ip.magics_manager.magics["line"]
    assert "nsml" in ip.magics_manager.magics["cell"]


def test_an_unknown_verb_is_a_usage_error_listing_the_verbs(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match=r"unknown verb; choose from .*gpustat"):
        ip.run_line_magic("nsml", "bogus")


def test_no_verb_is_a_usage_error(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="usage: %nsml VERB"):
        ip.run_line_magic("nsml", "")


def test_a_bad_option_is_a_usage_error_not_a_traceback(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        ip.run_line_magic("nsml", "gpustat --bogus")


def test_only_run_takes_a_cell(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="only '%%nsml run' takes a cell"):
        ip.run_cell_magic("nsml", "gpustat", "print(1)")


def test_help_lists_every_verb(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("nsml", "help")
    assert "gpustat" in capsys.readouterr().out


def test_unbalanced_quotes_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot parse"):
        split_dashdash("run 'train.py")


@pytest.mark.parametrize(
    ("line", "head", "tail"),
    [
        ("run train.py", "run train.py", []),
        ("run -g 2 train.py -- --lr 0.1", "run -g 2 train.py", ["--lr", "0.1"]),
        ("run x.py -- a -- b", "run x.py", ["a", "--", "b"]),
        ("run 'my script.py' -- 'two words'", "run 'my script.py'", ["two words"]),
    ],
)
def test_what_follows_dashdash_goes_to_the_script(line: str, head: str, tail: list[str]) -> None:
    assert split_dashdash(line) == (head, tail)


def test_the_status_line_shows_state_progress_metrics_and_gpus() -> None:
    html = render_status(
        {
            "name": "alice/mnist/3",
            "state": "running",
            "node": "gpu-1",
            "gpu_ids": ["0", "1"],
            "gpu_use": [
                {"index": 0, "utilization_pct": 90, "memory_used_mib": 1000},
                {"index": 1, "utilization_pct": 70, "memory_used_mib": 500},
            ],
            "last_step": 120,
            "last_metrics": {"epoch": 2, "loss": 0.123456},
        }
    )
    for text in (
        "alice/mnist/3",
        "running",
        "epoch 2",
        "step 120",
        "loss 0.1235",
        "GPU 0,1",
        "GPU use 80%, 1500 MiB",
    ):
        assert text in html


def test_the_status_line_shows_why_a_session_failed() -> None:
    html = render_status(
        {"name": "a/b/1", "state": "oom_killed", "exit_code": 137, "message": "<over 64M>"}
    )
    assert "exit 137" in html and "&lt;over 64M&gt;" in html


def test_the_status_line_follows_until_the_session_ends_and_survives_errors() -> None:
    answers: list[Any] = [
        {"name": "a/b/1", "state": "queued", "queue": {"position": 2, "reason": "busy"}},
        RuntimeError("server restarting"),
        {"name": "a/b/1", "state": "running", "last_step": 5, "last_metrics": {}},
        {"name": "a/b/1", "state": "completed", "exit_code": 0},
        {"name": "a/b/1", "state": "never read"},
    ]
    seen: list[str] = []

    def fetch() -> Mapping[str, Any]:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return dict(a)

    line = StatusLine(fetch, interval_s=0.001)
    original = line.render

    def render(s: Mapping[str, Any]) -> str:
        seen.append(str(s["state"]))
        return original(s)

    line.render = render

    async def main() -> None:
        line.start()
        assert line.task is not None
        await asyncio.wait_for(line.task, 10)

    asyncio.run(main())
    assert seen == ["queued", "running", "completed"]
    assert "completed" in line.widget.value and "exit 0" in line.widget.value
    assert len(answers) == 1  # it stopped polling at the final state


def test_cli_verbs_are_magic_verbs_with_the_clis_arguments(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match=r"invalid choice: 'bogus' \(choose from"):
        ip.run_line_magic("nsml", "nodes --state bogus")


def test_a_verbs_help_prints_and_returns(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ip.run_line_magic("nsml", "nodes -h") is None
    assert "%nsml nodes" in capsys.readouterr().out


def test_without_a_server_configured_the_error_says_what_to_set(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("NSML_API_URL", "NSML_TOKEN", "JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match="NSML_API_URL"):
        ip.run_line_magic("nsml", "whoami")
