"""What the CLI and the magics say: each thing once, in plain words, results on standard output
(so that JupyterLab never shows a summary as an error), argument differences as a table, GPUs
with their index, use and whether they are virtual."""

from __future__ import annotations

import re
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from gpu_scheduler import ClusterSnapshot, schedule
from nsml import datasets as ds
from nsml._fmt import args_table, pair_args
from nsml.cli import main
from nsml.cli_dataset import push_note
from nsml.cli_session import diff_text, status_text
from nsml_magics.magics import NSMLMagics
from nsml_magics.status import render_status
from nsml_server.scheduler import detail
from tests.unit.fakeapi import FakeAPI, gpu, node
from tests.unit.test_queue import job
from tests.unit.test_queue import node as queue_node


def status(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "alice/_/1",
        "state": "completed",
        "message": "Completed (exit code 0).",
        "entry": "train.py",
        "args": ["--lr", "0.1"],
        "image": "jupyter-nsml/singleuser:latest",
        "resources": {"gpus": 0.0, "cpu": 1.0, "memory_mib": 1024},
        "datasets": [],
        "node": "node-a",
        "gpu_ids": [],
        "exit_code": 0,
        "created": "2026-01-01T00:00:00Z",
        "started": "2026-01-01T00:00:01Z",
        "finished": "2026-01-01T00:00:09Z",
        "queue": None,
        "last_metrics": {},
        "last_step": None,
    }
    return {**base, **kw}


def test_a_completed_session_says_completed_once() -> None:
    text = status_text(status())
    assert text.splitlines()[0] == "alice/_/1: completed"
    assert "Completed" not in text and "exit code 0" in text


def test_a_failed_session_says_why_once() -> None:
    msg = "Failed with exit code 1 (ZeroDivisionError: division by zero)."
    text = status_text(status(state="failed", exit_code=1, message=msg))
    assert text.splitlines()[0] == "alice/_/1: failed"
    assert text.count("ZeroDivisionError") == 1 and f"why       {msg}" in text


def test_a_queued_session_gives_its_position_and_reason_once() -> None:
    reason = "waiting for resources: 0/1 nodes are available: 1 Insufficient cpu."
    st = status(state="queued", message=None, queue={"position": 2, "reason": reason})
    text = status_text(st)
    assert text.count("Insufficient cpu") == 1 and "queue     #2: waiting" in text


def test_the_scheduler_gives_each_reason_once_when_a_node_is_reserved() -> None:
    snap = ClusterSnapshot([queue_node("node-a", 2, free=[0, 1000])])
    (w,) = schedule([job("u/d/1", 2)], snap).waiting
    message = w.reason + detail(w.reasons, said=w.reason)
    assert message.count("Insufficient gpu: requested 2, free 1 on node-a") == 1, message
    assert w.kind == "reserved"


PAIRS = [
    (["--lr", "0.1", "--epochs=3", "-v", "--amp", "data.csv"],
     [("--lr", "0.1"), ("--epochs", "3"), ("-v", None), ("--amp", "data.csv")]),
    (["--shift", "-1", "--scale", "-0.5e-3"], [("--shift", "-1"), ("--scale", "-0.5e-3")]),
    (["a", "b", "--flag"], [("#1", "a"), ("#2", "b"), ("--flag", None)]),
    ([], []),
]  # fmt: skip


@pytest.mark.parametrize(("args", "pairs"), PAIRS)
def test_script_arguments_pair_names_with_values(
    args: list[str], pairs: list[tuple[str, str | None]]
) -> None:
    assert pair_args(args) == pairs


def test_argument_differences_are_rows_of_name_a_and_b() -> None:
    a = ["--lr", "0.1", "--epochs", "3", "--amp"]
    b = ["--lr", "0.3", "--epochs", "3", "--seed", "7"]
    rows = [("--lr", "0.1", "0.3"), ("--amp", "(flag)", "-"), ("--seed", "-", "7")]
    assert args_table(a, b) == rows


def test_diff_shows_arguments_as_a_table_and_code_as_a_unified_diff() -> None:
    code = "--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-lr = 0.1\n+lr = 0.3\n"
    d = {
        "a": "alice/_/1",
        "b": "alice/_/2",
        "args": {"a": ["--lr", "0.1"], "b": ["--lr", "0.3"]},
        "args_diff": "--- alice/_/1\n+++ alice/_/2\n@@ -1 +1 @@\n---lr 0.1\n+--lr 0.3\n",
        "fields": {
            "resources": {
                "a": {"gpus": 1, "cpu": 1.0, "memory_mib": 1024},
                "b": {"gpus": 2, "cpu": 1.0, "memory_mib": 1024},
            }
        },
        "code": [
            {"path": "train.py", "change": "changed", "diff": code},
            {"path": "w.bin", "change": "added", "diff": None},
        ],
    }
    lines = diff_text(d).splitlines()
    assert lines[0].split() == ["NAME", "alice/_/1", "alice/_/2"]
    assert lines[1].split() == ["--lr", "0.1", "0.3"]
    assert lines[2].split() == ["gpus", "1", "2"]
    assert "---lr" not in diff_text(d) and "+--lr" not in diff_text(d)
    assert code.rstrip("\n") in diff_text(d)
    assert "added: w.bin (binary or too large to compare)" in lines


def test_the_same_code_and_arguments_say_so() -> None:
    d = {"a": "a/_/1", "b": "a/_/2", "args": {"a": [], "b": []}, "fields": {}, "code": []}
    assert diff_text(d) == "a/_/1 and a/_/2 run the same code with the same arguments"


def result(transport: str, new: int = 1024, sent: int = 1024) -> ds.PushResult:
    version = {"ref": "mnist@1", "files": 3, "bytes": 2048}
    return ds.PushResult("mnist@1", version, sent, new, transport)


@pytest.mark.parametrize(
    ("transport", "said"),
    [
        ("local", "mnist@1: 3 files, 2.0 KiB (1.0 KiB of it new; "
         "the rest was in versions you can read); "
         "the server read the files from this machine's disk (nothing was sent over the network)"),
        ("http", "mnist@1: 3 files, 2.0 KiB (1.0 KiB of it new; "
         "the rest was in versions you can read); 1.0 KiB sent over the network"),
    ],
)  # fmt: skip
def test_the_push_summary_is_plain_words(transport: str, said: str) -> None:
    assert push_note(result(transport)) == said
    assert "handed over" not in push_note(result(transport))


@pytest.fixture()
def fake_push(monkeypatch: pytest.MonkeyPatch, nsml_env: pytest.MonkeyPatch) -> FakeAPI:
    monkeypatch.setattr(ds, "push", lambda *a, **k: result("local"))
    fake = FakeAPI()  # never started: a push goes through the replaced function
    nsml_env.setenv("NSML_API_URL", fake.url)
    nsml_env.setenv("NSML_TOKEN", "t")
    return fake


def test_the_cli_prints_the_version_for_scripts_and_the_summary_as_a_note(
    fake_push: FakeAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dataset", "push", "mnist", "."]) == 0
    out, err = capsys.readouterr()
    assert out == "mnist@1\n"
    assert err.startswith("mnist@1: 3 files")


@pytest.fixture(scope="module")
def ip() -> InteractiveShell:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nsml_magics")
    return shell


def magics(ip: InteractiveShell) -> NSMLMagics:
    m = ip.magics_manager.registry["NSMLMagics"]
    assert isinstance(m, NSMLMagics)
    m._client = None
    return m


def test_in_a_notebook_the_push_result_and_summary_are_output_not_errors(
    ip: InteractiveShell, fake_push: FakeAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    magics(ip)
    ip.run_line_magic("nsml", "dataset push mnist .")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["mnist@1", push_note(result("local"))]
    assert err == ""


def test_gpustat_in_a_notebook_shows_index_0_utilization_and_virtual_gpus(
    ip: InteractiveShell, nsml_env: pytest.MonkeyPatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = [
        node("real", "nvml", [gpu(0, 37, used=1200)]),
        node("trial", "virtual", [gpu(0, None)]),
    ]
    shown: list[Any] = []
    monkeypatch.setattr("nsml_magics.magics.display", shown.append)
    with FakeAPI.running({"nodes": {"nodes": nodes}}) as fake:
        nsml_env.setenv("NSML_API_URL", fake.url)
        nsml_env.setenv("NSML_TOKEN", "t")
        magics(ip)
        ip.run_line_magic("nsml", "gpustat")
    (table,) = shown
    rows = [
        re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", table.data)
    ]
    assert rows[1] == ["real", "up", "0", "NVIDIA A100", "0", "1200/40960 MiB", "37%"]
    assert rows[2] == ["trial", "up", "0", "NVIDIA Virtual GPU (virtual)", "0", "40960 MiB", "-"]


def test_the_status_line_shows_the_sessions_gpus_a_share_and_their_use() -> None:
    running = {"name": "a/_/1", "state": "running", "node": "node-a"}
    whole = render_status({**running, "gpu_ids": ["0", "1"], "resources": {"gpus": 2}})
    assert "node-a GPU 0,1" in whole and "GPU use" not in whole  # no use reported
    share = render_status({**running, "gpu_ids": ["2"], "resources": {"gpus": 0.5}})
    assert "node-a 0.5 of GPU 2" in share
    used = render_status(
        {
            **running,
            "gpu_ids": ["0"],
            "gpu_use": [{"index": 0, "utilization_pct": 91, "memory_used_mib": 2048}],
        }
    )
    assert "GPU use 91%, 2048 MiB" in used
    queued = render_status({"name": "a/_/2", "state": "queued", "queue": {"position": 3}})
    assert "#3 in queue" in queued and "GPU" not in queued
