"""LocalProcessBackend against real subprocesses: exit codes, logs, signals, limits, restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nsml_server.backends import (
    BackendError,
    LocalProcessBackend,
    Mount,
    NameConflict,
    RunNotFound,
    RunSpec,
    RunState,
    select_backend,
)
from nsml_server.backends.local import rewrite_path

T = TypeVar("T")
PY = sys.executable
MiB = 1024 * 1024


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def spec(name: str, *command: str, **kwargs: Any) -> RunSpec:
    return RunSpec(name=name, image="ignored", command=list(command), **kwargs)


def py(name: str, code: str, **kwargs: Any) -> RunSpec:
    env = {"PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return spec(name, PY, "-c", code, env=env, **kwargs)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def is_our_supervisor(pid: int, root: Path) -> bool:
    """The process is a supervisor of a run under *root* (not a process that reused the PID)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"_supervisor.py") for a in argv) and any(
        a.startswith(str(root).encode()) for a in argv
    )


def state_of(root: Path) -> dict[str, Any]:
    runs: dict[str, Any] = json.loads((root / "state.json").read_text())["runs"]
    return runs


async def wait_for_log(
    backend: LocalProcessBackend, handle: str, text: str, timeout: float = 15
) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = await backend.logs(handle)
        if text in out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the logs after {timeout}s:\n{out}")
        await asyncio.sleep(0.05)


@pytest.fixture()
def root(tmp_path: Path) -> Iterator[Path]:
    """The backend's folder; every process group started there is killed afterwards."""
    path = tmp_path / "local-runs"
    yield path
    if (path / "state.json").exists():
        for rec in state_of(path).values():
            if pid_alive(rec["pid"]) and is_our_supervisor(rec["pid"], path):
                try:
                    os.killpg(rec["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture()
def backend(root: Path) -> LocalProcessBackend:
    return LocalProcessBackend(root)


# ---------------------------------------------------------------------------------------------


def test_exit_code_logs_and_times(backend: LocalProcessBackend) -> None:
    async def go() -> None:
        h = await backend.start(spec("exit7", "sh", "-c", "echo out; echo err >&2; exit 7"))
        st = await backend.wait(h, timeout_s=15)
        assert st.state is RunState.EXITED and st.exit_code == 7 and not st.oom_killed
        assert st.started_at and st.finished_at and st.started_at <= st.finished_at
        assert await backend.logs(h) == "out\nerr\n"

    run(go())


def test_logs_tail_returns_the_last_lines(backend: LocalProcessBackend) -> None:
    async def go() -> None:
        h = await backend.start(
            spec("tail", "sh", "-c", "i=1; while [ $i -le 5000 ]; do echo line$i; i=$((i+1)); done")
        )
        await backend.wait(h, timeout_s=15)
        assert await backend.logs(h, tail=3) == "line4998\nline4999\nline5000\n"
        assert await backend.logs(h, tail=0) == ""
        assert (await backend.logs(h)).count("\n") == 5000

    run(go())


def test_stop_lets_a_sigterm_handler_finish(backend: LocalProcessBackend) -> None:
    code = (
        "import signal, sys, time\n"
        "def bye(*a):\n"
        "    print('got TERM, saving', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def go() -> None:
        h = await backend.start(py("graceful", code))
        await wait_for_log(backend, h, "ready")
        assert (await backend.status(h)).state is RunState.RUNNING
        t0 = time.monotonic()
        await backend.stop(h, grace_s=10)
        assert time.monotonic() - t0 < 5, "a program that exits on SIGTERM is not waited for"
        st = await backend.status(h)
        assert (st.state, st.exit_code) == (RunState.EXITED, 0)
        assert "got TERM, saving" in await backend.logs(h)

    run(go())


def test_stop_kills_after_the_grace_period(backend: LocalProcessBackend) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def go() -> None:
        h = await backend.start(py("stubborn", code))
        await wait_for_log(backend, h, "ready")
        t0 = time.monotonic()
        await backend.stop(h, grace_s=0.5)
        assert time.monotonic() - t0 >= 0.5
        st = await backend.status(h)
        assert (st.state, st.exit_code) == (RunState.EXITED, 137)
        assert st.finished_at is not None

    run(go())


def test_default_sigterm_gives_exit_143_even_right_after_the_start(
    backend: LocalProcessBackend,
) -> None:
    """A stop at once after ``start`` reaches the program, not a supervisor still starting
    (which SIGTERM would kill before it set its handlers, leaving no exit status)."""

    async def go() -> None:
        h = await backend.start(spec("sleeper", "sleep", "60"))
        await backend.stop(h, grace_s=5)
        assert (await backend.status(h)).exit_code == 128 + signal.SIGTERM

    run(go())


def test_stop_and_end_take_the_whole_process_group(
    backend: LocalProcessBackend, tmp_path: Path
) -> None:
    async def go() -> None:
        bg = tmp_path / "bg.pid"
        h = await backend.start(
            spec("group", "sh", "-c", f"sleep 60 & echo $! > {bg}; echo ready; wait")
        )
        await wait_for_log(backend, h, "ready")
        child = int(bg.read_text())
        assert pid_alive(child)
        await backend.stop(h, grace_s=2)
        assert not pid_alive(child), "the background child must die with the run"

        left = tmp_path / "left.pid"
        h2 = await backend.start(
            spec("leftover", "sh", "-c", f"sleep 60 & echo $! > {left}; exit 0")
        )
        assert (await backend.wait(h2, timeout_s=15)).exit_code == 0
        await asyncio.sleep(0.2)
        assert not pid_alive(int(left.read_text())), "what the program leaves behind is killed"

    run(go())


def test_memory_limit_is_best_effort_rlimit_as(backend: LocalProcessBackend) -> None:
    code = "b = bytearray(320 * 1024 * 1024); print('allocated', flush=True)"

    async def go() -> None:
        h = await backend.start(py("hungry", code, mem_limit_bytes=256 * MiB))
        st = await backend.wait(h, timeout_s=30)
        assert st.state is RunState.EXITED and st.exit_code != 0
        assert "MemoryError" in await backend.logs(h)
        assert st.oom_killed is False, "RLIMIT_AS fails allocations; nothing is OOM-killed"

        # With GPUs the limit is not applied (CUDA reserves huge address ranges).
        h2 = await backend.start(py("hungry-gpu", code, mem_limit_bytes=256 * MiB, gpu_ids=["0"]))
        assert (await backend.wait(h2, timeout_s=30)).exit_code == 0
        assert "allocated" in await backend.logs(h2)

    run(go())


def test_remove_is_idempotent_and_kills(backend: LocalProcessBackend) -> None:
    async def go() -> None:
        h = await backend.start(spec("to-remove", "sleep", "60"))
        pid = state_of(backend.root_dir)[h]["pid"]
        await backend.remove(h)
        assert not pid_alive(pid)
        assert not (backend.root_dir / "runs" / h).exists()
        await backend.remove(h)
        await backend.remove("no-such-handle")
        await backend.stop("no-such-handle", grace_s=1)
        assert (await backend.status(h)).state is RunState.MISSING
        with pytest.raises(RunNotFound):
            await backend.logs(h)
        # Stopping a run that has ended is a no-op too.
        h2 = await backend.start(spec("short", "true"))
        await backend.wait(h2, timeout_s=15)
        await backend.stop(h2, grace_s=1)
        assert (await backend.status(h2)).exit_code == 0

    run(go())


def test_state_survives_a_new_backend_instance(root: Path) -> None:
    async def go() -> None:
        first = LocalProcessBackend(root)
        running = await first.start(
            spec("long", "sleep", "60", labels={"nsml.session": "alice/mnist/1"})
        )
        done = await first.start(
            spec(
                "done",
                "sh",
                "-c",
                "echo finished; exit 3",
                labels={"nsml.session": "alice/mnist/2"},
            )
        )
        await first.wait(done, timeout_s=15)

        second = LocalProcessBackend(root)  # as after a server restart
        assert (await second.status(running)).state is RunState.RUNNING
        assert (await second.status(done)).exit_code == 3
        assert await second.logs(done) == "finished\n"
        assert await second.list({"nsml.session": "alice/mnist/1"}) == [running]
        assert sorted(await second.list({})) == sorted([running, done])
        await second.stop(running, grace_s=5)
        st = await first.status(running)
        assert (st.state, st.exit_code) == (RunState.EXITED, 143)

    run(go())


def test_a_reused_pid_is_not_mistaken_for_the_run(root: Path) -> None:
    async def go() -> None:
        first = LocalProcessBackend(root)
        h = await first.start(spec("victim", "sleep", "60"))
        await asyncio.sleep(0.1)
        state = json.loads((root / "state.json").read_text())
        pid = state["runs"][h]["pid"]
        state["runs"][h]["start_ticks"] -= 1  # as if the PID now belonged to another process
        (root / "state.json").write_text(json.dumps(state))

        second = LocalProcessBackend(root)
        st = await second.status(h)
        assert st.state is RunState.EXITED and st.exit_code is None
        assert st.error and "without recording its exit status" in st.error
        await second.stop(h, grace_s=0.1)
        assert pid_alive(pid), "a process that is not the run must not be signalled"
        os.killpg(pid, signal.SIGKILL)

    run(go())


def test_environment_gpus_and_no_server_secrets(
    backend: LocalProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "server-secret")

    async def go() -> None:
        h = await backend.start(
            spec("env", "env", env={"NSML_SESSION": "alice/mnist/1"}, gpu_ids=["1", "3"])
        )
        await backend.wait(h, timeout_s=15)
        env = dict(line.split("=", 1) for line in (await backend.logs(h)).splitlines())
        assert env["NSML_SESSION"] == "alice/mnist/1"
        assert env["CUDA_VISIBLE_DEVICES"] == "1,3", "host processes see host GPU indices"
        assert env["NVIDIA_VISIBLE_DEVICES"] == "1,3"
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert "JUPYTERHUB_API_TOKEN" not in env
        assert "PATH" in env

        h2 = await backend.start(spec("no-gpu", "env", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}))
        await backend.wait(h2, timeout_s=15)
        env2 = dict(line.split("=", 1) for line in (await backend.logs(h2)).splitlines())
        assert env2["CUDA_VISIBLE_DEVICES"] == "", "a run without GPUs cannot pick some"
        assert env2["NVIDIA_VISIBLE_DEVICES"] == "void"

    run(go())


def test_mounts_are_emulated_by_rewriting_paths(
    backend: LocalProcessBackend, tmp_path: Path
) -> None:
    data = tmp_path / "datasets" / "mnist@3"
    data.mkdir(parents=True)
    (data / "hello.txt").write_text("hello from the dataset\n")

    async def go() -> None:
        h = await backend.start(
            spec(
                "mounted",
                "sh",
                "-c",
                'cat "$1"; echo "$DATASET_PATH"; pwd; echo /data/mnist/inside-a-script',
                "sh",
                "/data/mnist/hello.txt",
                env={"DATASET_PATH": "/data/mnist"},
                workdir="/data/mnist",
                mounts=[Mount(str(data), "/data/mnist", read_only=True)],
            )
        )
        await backend.wait(h, timeout_s=15)
        assert (await backend.logs(h)).splitlines() == [
            "hello from the dataset",
            str(data),
            str(data),
            "/data/mnist/inside-a-script",  # only whole arguments and values are rewritten
        ]
        with pytest.raises(BackendError, match="does not exist"):
            await backend.start(
                spec("bad-mount", "true", mounts=[Mount(str(tmp_path / "nope"), "/data")])
            )
        with pytest.raises(BackendError, match="working directory"):
            await backend.start(spec("bad-workdir", "true", workdir=str(tmp_path / "nope")))

    run(go())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/data", "/srv/d"),
        ("/data/x/y", "/srv/d/x/y"),
        ("/data2/x", "/data2/x"),
        ("/data/mnist/train", "/srv/mnist/train"),
        ("relative/data", "relative/data"),
        ("--lr=0.1", "--lr=0.1"),
    ],
)
def test_rewrite_path(value: str, expected: str) -> None:
    mounts = [Mount("/srv/d", "/data"), Mount("/srv/mnist/", "/data/mnist/")]
    assert rewrite_path(value, mounts) == expected


def test_names_are_unique_until_removed(backend: LocalProcessBackend) -> None:
    async def go() -> None:
        h = await backend.start(spec("same", "true"))
        with pytest.raises(NameConflict, match="'same' already exists"):
            await backend.start(spec("same", "true"))
        await backend.remove(h)
        h2 = await backend.start(spec("same", "true"))
        assert h2 != h

    run(go())


def test_a_missing_program_exits_127_and_says_why(backend: LocalProcessBackend) -> None:
    async def go() -> None:
        h = await backend.start(spec("typo", "pythn3", "main.py"))
        st = await backend.wait(h, timeout_s=15)
        assert st.exit_code == 127 and st.error and "pythn3" in st.error
        assert "cannot run 'pythn3'" in await backend.logs(h)

    run(go())


def test_started_at_uses_the_injected_clock(root: Path) -> None:
    frozen = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

    async def go() -> None:
        b = LocalProcessBackend(root, now=lambda: frozen)
        h = await b.start(spec("clock", "true"))
        assert (await b.wait(h, timeout_s=15)).started_at == frozen

    run(go())


def test_it_warns_loudly_and_describes_no_isolation(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        b = LocalProcessBackend(root)
    assert any("ISOLATES NOTHING" in r.getMessage() for r in caplog.records)
    info = b.describe()
    assert info["kind"] == "local" and info["isolation"] is False and info["endpoint"] is None
    assert run(b.ping()) is True


def test_select_backend_falls_back_to_local_when_no_engine_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test-select")
    with caplog.at_level(logging.WARNING):
        b = run(select_backend(f"unix://{tmp_path}/no-engine.sock", tmp_path / "state", log))
    assert isinstance(b, LocalProcessBackend)
    assert any("falling back" in r.getMessage() for r in caplog.records)
    assert any("ISOLATES NOTHING" in r.getMessage() for r in caplog.records)


def test_a_run_without_network_is_refused_locally_and_says_what_it_needs(
    backend: LocalProcessBackend,
) -> None:
    cut_off = RunSpec(name="eval", image="x", command=["true"], network="none")
    with pytest.raises(BackendError) as e:
        run(backend.start(cut_off))
    assert e.value.reason == "isolation_unavailable"
    assert "need a Docker engine on the node" in e.value.message
    with pytest.raises(ValueError, match="network 'bridge' must be 'host' or 'none'"):
        RunSpec(name="x", image="x", command=["true"], network="bridge")
