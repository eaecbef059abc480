"""Run workloads as plain local processes: the fallback when no Docker engine answers.

This backend ISOLATES NOTHING. Every run is a process of the server's own user on the
server's machine: it can read and write whatever that user can, see every GPU, and use any
amount of CPU. Use it for a single-user trial on a machine without Docker, never for shared
use. What it does, exactly:

* **Process**: the command runs under a small supervisor (``_supervisor.py``) that leads a
  new process group and records the exit status in a file, so that a restarted server can
  still read it. ``stop`` sends SIGTERM to the whole group, waits for the grace period, then
  SIGKILLs the group (exit code 137). When the program ends, what is left of its group is
  killed, as the end of a container would. ``start`` returns once the supervisor says the
  program runs, so that a stop right after it reaches the program.
* **Environment**: only ``PATH``, ``HOME``, ``LANG``, ``LC_ALL``, ``TZ``, ``TMPDIR``, ``USER``,
  ``LOGNAME`` and ``SHELL`` are taken from the server's environment (so its tokens do not
  leak into runs), then ``spec.env``, then the GPU variables (host GPU indices or UUIDs in
  ``CUDA_VISIBLE_DEVICES`` and ``NVIDIA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER=PCI_BUS_ID``).
* **Mounts** are emulated by rewriting paths: every command argument, environment value and
  the working directory that equals a mount's ``target`` or lies under ``target/`` is
  rewritten to the same path under ``source`` (the longest matching target wins). Paths
  inside a longer argument (a script given to ``sh -c``) or computed by the program are not
  rewritten, and ``read_only`` is NOT enforced. A missing source is an error,
  as with Docker.
* **Working directory**: the rewritten ``spec.workdir`` (which must exist), else a fresh
  ``work/`` folder in the run's folder.
* **Memory**: ``mem_limit_bytes`` becomes ``RLIMIT_AS`` (virtual address space), best effort:
  allocations beyond it fail (Python raises MemoryError) instead of an OOM kill, so
  ``oom_killed`` is always False. It is not applied to runs with GPUs, because CUDA reserves
  far more address space than it uses. ``cpu_limit`` is not enforced. ``image`` is ignored.
* **State**: ``ROOT/state.json`` (written atomically under ``ROOT/state.lock``) keeps every
  run's PID, process start time and boot id, so a restarted server can query and stop runs
  without mistaking a reused PID for its run; ``ROOT/runs/HANDLE/`` holds ``output.log``
  and the exit file. Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .base import (
    BackendError,
    ExecutionBackend,
    Mount,
    NameConflict,
    RunNotFound,
    RunSpec,
    RunState,
    RunStatus,
    gpu_env,
)

__all__ = ["ISOLATION_WARNING", "LocalProcessBackend", "rewrite_path"]

log = logging.getLogger(__name__)

ISOLATION_WARNING = (
    "the local-process backend ISOLATES NOTHING: sessions and notebook servers run as plain "
    "processes of this server's user, can read and write everything it can (other users' "
    "files included), see every GPU, and have no CPU limit and only a best-effort memory "
    "limit. Use a Docker engine for anything but a single-user trial."
)
SUPERVISOR = Path(__file__).with_name("_supervisor.py")
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_KILL_WAIT_S = 5.0
# How long ``start`` waits for the supervisor to say the program runs (a loaded machine can
# take seconds to start a Python interpreter); past it, ``start`` returns anyway.
_STARTED_WAIT_S = 30.0
_POLL_S = 0.05


def visible(spec: RunSpec) -> list[Mount]:
    """What a local process sees of *spec*: its mounts, and its copies in place (a process on
    the server's own machine reads the copied folder where it is)."""
    return [*spec.mounts, *spec.copies]


def rewrite_path(value: str, mounts: Sequence[Mount]) -> str:
    """Rewrite *value* when it is a mount target or a path under one (longest target wins).

    >>> rewrite_path("/data/mnist/train", [Mount("/srv/ds/mnist@3", "/data/mnist")])
    '/srv/ds/mnist@3/train'
    """
    best: Mount | None = None
    best_len = -1
    for m in mounts:
        target = m.target.rstrip("/")
        if target and (value == target or value.startswith(target + "/")):
            if len(target) > best_len:
                best, best_len = m, len(target)
    if best is None:
        return value
    return (best.source.rstrip("/") + value[best_len:]) or "/"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) of *pid*, or None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain anything; fields follow the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _tail(path: Path, lines: int | None) -> str:
    """The file's text, or its last *lines* lines (read backwards in blocks)."""
    try:
        with path.open("rb") as f:
            if lines is None:
                return f.read().decode("utf-8", "replace")
            if lines <= 0:
                return ""
            pos = f.seek(0, os.SEEK_END)
            data = b""
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except FileNotFoundError:
        return ""
    kept = data.splitlines(keepends=True)[-lines:]
    return b"".join(kept).decode("utf-8", "replace")


class LocalProcessBackend(ExecutionBackend):
    """Runs as local processes, with no isolation (see the module documentation).

    Args:
        root_dir: folder for the state file and the runs' logs (created, mode 0700).
        python: the interpreter that runs the supervisor.
        logger: where to log; the constructor logs :data:`ISOLATION_WARNING` there.
        now: the clock for ``started_at`` (injectable for tests).
    """

    kind = "local"

    def __init__(
        self,
        root_dir: Path | str,
        *,
        python: str = sys.executable,
        logger: logging.Logger | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.root_dir = Path(root_dir)
        self._python = python
        self._log = logger or log
        self._now = now
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._boot = _boot_id()
        self.root_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root_dir / "runs").mkdir(exist_ok=True)
        self._log.warning("WARNING: %s (state in %s)", ISOLATION_WARNING, self.root_dir)

    # -- state file --------------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.root_dir / "state.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The run records, locked against other backends on the same folder; saved on exit."""
        with open(self.root_dir / "state.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                runs = self._read()
                before = json.dumps(runs, sort_keys=True)
                yield runs
                if json.dumps(runs, sort_keys=True) != before:
                    tmp = self._state_path.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"version": 1, "runs": runs}, indent=1))
                    os.replace(tmp, self._state_path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise BackendError(
                f"the local backend's state file {self._state_path} is unreadable ({e}); "
                "move it away to start afresh (runs it listed are then forgotten)"
            ) from e
        runs: dict[str, Any] = data.get("runs", {})
        return runs

    def _record(self, handle: str) -> dict[str, Any] | None:
        with self._locked() as runs:
            rec: dict[str, Any] | None = runs.get(handle)
            return rec

    def _run_dir(self, handle: str) -> Path:
        return self.root_dir / "runs" / handle

    # -- processes ---------------------------------------------------------------------------

    def _alive(self, handle: str, rec: Mapping[str, Any]) -> bool:
        """True while the run's supervisor lives (same PID, same start time, same boot)."""
        child = self._children.get(handle)
        if child is not None and child.poll() is not None:
            del self._children[handle]  # reaped
        if rec.get("boot_id") != self._boot:
            return False
        stat = _proc_stat(int(rec["pid"]))
        return stat is not None and stat[1] == rec["start_ticks"] and stat[0] not in ("Z", "X")

    def _signal(self, handle: str, rec: Mapping[str, Any], sig: signal.Signals) -> None:
        if not self._alive(handle, rec):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(rec["pid"]), sig)

    async def _wait_gone(self, handle: str, rec: Mapping[str, Any], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._alive(handle, rec):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    def _environment(self, spec: RunSpec) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.setdefault("PATH", DEFAULT_PATH)
        env.update({k: rewrite_path(v, visible(spec)) for k, v in spec.env.items()})
        env.update(gpu_env(spec.gpu_ids, container_local=False))
        return env

    def _spawn(
        self, argv: list[str], cwd: Path, env: dict[str, str], log_path: Path
    ) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            return subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    # -- the API -----------------------------------------------------------------------------

    async def ping(self) -> bool:
        """True when the state folder is writable."""
        return os.access(self.root_dir, os.W_OK | os.X_OK)

    async def start(self, spec: RunSpec) -> str:
        """Start *spec* as a local process group; return its handle.

        Raises:
            NameConflict: a run with this name exists (until removed).
            BackendError: a mount source or the working directory does not exist, or the run
                asks for no network (a local process cannot be cut off; use Docker).
        """
        if spec.network != "host":
            raise BackendError(
                f"{spec.name}: a local process cannot be cut off the network; runs without "
                "network (evaluations) need a Docker engine on the node",
                reason="isolation_unavailable",
            )
        for m in visible(spec):
            if not os.path.exists(m.source):
                raise BackendError(
                    f"{spec.name}: mount source {m.source!r} (for {m.target}) does not exist",
                    reason="mount_source_missing",
                )
        handle = secrets.token_hex(12)
        run_dir = self._run_dir(handle)
        if spec.workdir:
            workdir = Path(rewrite_path(spec.workdir, visible(spec)))
            if not workdir.is_dir():
                raise BackendError(
                    f"{spec.name}: working directory {spec.workdir!r} ({workdir}) does not exist",
                    reason="workdir_missing",
                )
        else:
            workdir = run_dir / "work"
        mem_limit = spec.mem_limit_bytes or 0
        if mem_limit and spec.gpu_ids:
            self._log.info(
                "%s: memory limit not applied locally: runs with GPUs cannot take RLIMIT_AS",
                spec.name,
            )
            mem_limit = 0
        if spec.cpu_limit is not None:
            self._log.debug("%s: cpu_limit %.2f not enforced locally", spec.name, spec.cpu_limit)
        command = [rewrite_path(a, visible(spec)) for a in spec.command]
        argv = [self._python, "-I", str(SUPERVISOR), str(run_dir / "exit.json")]
        argv += [str(mem_limit), "--", *command]
        env = self._environment(spec)

        with self._locked() as runs:
            if any(r["name"] == spec.name for r in runs.values()):
                raise NameConflict(
                    f"a local run named {spec.name!r} already exists; remove it or choose "
                    "another name"
                )
            run_dir.mkdir(parents=True)
            if not spec.workdir:
                workdir.mkdir()
            log_path = run_dir / "output.log"
            try:
                proc = self._spawn(argv, workdir, env, log_path)
            except OSError as e:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise BackendError(f"{spec.name}: could not start the supervisor: {e}") from e
            stat = _proc_stat(proc.pid)
            runs[handle] = {
                "name": spec.name,
                "pid": proc.pid,
                "start_ticks": stat[1] if stat else None,
                "boot_id": self._boot,
                "labels": dict(spec.labels),
                "command": command,
                "gpu_ids": list(spec.gpu_ids),
                "started_at": self._now().isoformat(),
                "killed_at": None,
            }
        self._children[handle] = proc
        await self._wait_started(spec.name, handle, proc)
        self._log.info("%s: started local run %s (pid %d)", spec.name, handle, proc.pid)
        return handle

    async def _wait_started(self, name: str, handle: str, proc: subprocess.Popen[bytes]) -> None:
        """Wait until the supervisor has started the program (or ended, or never says so).

        Until then the supervisor has not set its signal handlers, and a stop would kill it
        before the program started, leaving no exit status.
        """
        run_dir = self._run_dir(handle)
        deadline = time.monotonic() + _STARTED_WAIT_S
        while not (run_dir / "started.json").exists() and not (run_dir / "exit.json").exists():
            if proc.poll() is not None:
                return
            if time.monotonic() >= deadline:
                self._log.warning(
                    "%s: the supervisor of local run %s did not say within %.0fs that the "
                    "program runs",
                    name,
                    handle,
                    _STARTED_WAIT_S,
                )
                return
            await asyncio.sleep(0.01)

    async def status(self, handle: str) -> RunStatus:
        """From the exit file when the run ended, else from ``/proc``; MISSING when unknown."""
        rec = self._record(handle)
        if rec is None:
            return RunStatus(state=RunState.MISSING)
        started = datetime.fromisoformat(rec["started_at"])
        alive = self._alive(handle, rec)
        try:
            ended = json.loads((self._run_dir(handle) / "exit.json").read_text())
        except (OSError, ValueError):
            ended = None
        if ended is not None:
            return RunStatus(
                state=RunState.EXITED,
                exit_code=ended["exit_code"],
                started_at=started,
                finished_at=datetime.fromisoformat(ended["finished_at"]),
                error=ended.get("error"),
            )
        if alive:
            return RunStatus(state=RunState.RUNNING, started_at=started)
        if rec.get("killed_at"):
            return RunStatus(
                state=RunState.EXITED,
                exit_code=128 + signal.SIGKILL,
                started_at=started,
                finished_at=datetime.fromisoformat(rec["killed_at"]),
            )
        return RunStatus(
            state=RunState.EXITED,
            started_at=started,
            error="the process ended without recording its exit status "
            "(killed from outside, or the machine restarted)",
        )

    async def logs(self, handle: str, tail: int | None = None) -> str:
        """The run's combined stdout and stderr."""
        if self._record(handle) is None:
            raise RunNotFound(f"no local run {handle!r}")
        return await asyncio.to_thread(_tail, self._run_dir(handle) / "output.log", tail)

    async def copy_logs(self, handle: str, dest: Path, skip: int = 0, poll_s: float = 0.2) -> int:
        """Append the run's output file to *dest* past *skip* bytes, until the run ends."""
        if self._record(handle) is None:
            raise RunNotFound(f"no local run {handle!r}")
        source = self._run_dir(handle) / "output.log"
        written = 0

        def pump() -> int:
            try:
                with source.open("rb") as src:
                    src.seek(skip + written)
                    data = src.read()
            except FileNotFoundError:
                return 0
            if data:
                with dest.open("ab") as out:
                    out.write(data)
            return len(data)

        while True:
            ended = (await self.status(handle)).state in (RunState.EXITED, RunState.MISSING)
            written += await asyncio.to_thread(pump)
            if ended:
                return written
            await asyncio.sleep(poll_s)

    async def stop(self, handle: str, grace_s: float = 10.0) -> None:
        """SIGTERM to the run's process group, wait up to *grace_s*, then SIGKILL."""
        rec = self._record(handle)
        if rec is None or not self._alive(handle, rec):
            return
        self._log.info("%s: stopping local run %s (grace %.1fs)", rec["name"], handle, grace_s)
        self._signal(handle, rec, signal.SIGTERM)
        if await self._wait_gone(handle, rec, grace_s):
            return
        with self._locked() as runs:
            if handle in runs:
                runs[handle]["killed_at"] = self._now().isoformat()
        self._log.info("%s: killing local run %s after %.1fs", rec["name"], handle, grace_s)
        self._signal(handle, rec, signal.SIGKILL)
        if not await self._wait_gone(handle, rec, _KILL_WAIT_S):
            raise BackendError(f"{rec['name']}: process {rec['pid']} survived SIGKILL")

    async def remove(self, handle: str) -> None:
        """Kill the run if needed, then delete its record, log and folder."""
        rec = self._record(handle)
        if rec is None:
            return
        if self._alive(handle, rec):
            await self.stop(handle, grace_s=0)
        with self._locked() as runs:
            runs.pop(handle, None)
        self._children.pop(handle, None)
        await asyncio.to_thread(shutil.rmtree, self._run_dir(handle), True)

    async def list(self, labels: Mapping[str, str]) -> builtins.list[str]:
        """Handles of all runs carrying every one of *labels*."""
        with self._locked() as runs:
            return [
                h
                for h, r in runs.items()
                if all(r.get("labels", {}).get(k) == v for k, v in labels.items())
            ]

    async def labelled(self, labels: Mapping[str, str]) -> dict[str, dict[str, str]]:
        """Every run carrying all of *labels*, with all its labels."""
        with self._locked() as runs:
            return {
                h: dict(r.get("labels", {}))
                for h, r in runs.items()
                if all(r.get("labels", {}).get(k) == v for k, v in labels.items())
            }

    def describe(self) -> dict[str, Any]:
        """``isolation`` is False, and ``warning`` says what that means."""
        return {
            "kind": self.kind,
            "endpoint": None,
            "root_dir": str(self.root_dir),
            "has_nvidia_runtime": False,
            "isolation": False,
            "warning": ISOLATION_WARNING,
        }
