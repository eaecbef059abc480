"""Supervisor of one run of the local-process backend (standard library only).

``LocalProcessBackend`` starts it as the leader of a new process group::

    python -I _supervisor.py EXIT_FILE MEM_LIMIT_BYTES -- PROGRAM ARGS...

Once its signal handlers are in place it starts the program in the same process group (same
working directory, environment and output), with ``RLIMIT_AS`` set to MEM_LIMIT_BYTES when that
is not 0, and waits for it. Signals sent to the group reach the program; the supervisor itself
ignores SIGTERM, SIGINT and SIGHUP (with a handler, so the program gets the default
dispositions) so that it lives to record the exit. When the program runs, it writes
``started.json`` (the program's PID) beside EXIT_FILE: the backend's ``start`` returns only
then, so that a stop right after a start reaches the program instead of killing a supervisor
that has not yet set its handlers. When the program ends, the supervisor writes EXIT_FILE
(JSON: ``exit_code``, 128 + N for signal N, ``signal``, ``finished_at``, ``error``)
atomically, then SIGKILLs what is left of the process group, as the end of a container would,
and exits with the program's code. It is the child subreaper of its descendants (Linux), so it
reaps what it kills.

Because the exit status lands in a file, a server started later can still read it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from types import FrameType


def _ignore(signum: int, frame: FrameType | None) -> None:
    """Keep the supervisor alive; the signal also reached the program through its group."""


def _become_subreaper() -> None:
    """Orphaned descendants become our children (``PR_SET_CHILD_SUBREAPER``), to be reaped."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group *pgid* other than this one (from ``/proc``)."""
    me = os.getpid()
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            fields = raw[raw.rfind(")") + 2 :].split()
            if len(fields) > 2 and fields[0] not in "ZX" and int(fields[2]) == pgid:
                found.append(int(entry))
    return found


def _reap() -> None:
    """Collect every exited child without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_leftovers() -> None:
    """SIGKILL what is left of our process group and reap it (bounded: 50 rounds)."""
    pgid = os.getpgid(0)
    for _ in range(50):
        members = _group_members(pgid)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01 if members else 0)
        _reap()
        if not members:
            return


def _write_exit(path: str, exit_code: int, sig: int | None, error: str | None) -> None:
    record = {
        "exit_code": exit_code,
        "signal": sig,
        "finished_at": datetime.now(UTC).isoformat(),
        "error": error,
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def started_path(exit_file: str) -> str:
    """Where the supervisor says that the program runs: ``started.json`` beside EXIT_FILE."""
    return os.path.join(os.path.dirname(exit_file), "started.json")


def _write_started(exit_file: str, pid: int) -> None:
    path = started_path(exit_file)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": pid}, f)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    """Run the program described by *argv*; return its exit code."""
    if len(argv) < 4 or argv[2] != "--":
        print("usage: _supervisor.py EXIT_FILE MEM_LIMIT_BYTES -- PROGRAM ARGS...", file=sys.stderr)
        return 2
    exit_file, mem_limit, command = argv[0], int(argv[1]), argv[3:]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _ignore)
    _become_subreaper()

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    try:
        proc = subprocess.Popen(command, preexec_fn=limit_memory if mem_limit > 0 else None)
    except OSError as e:
        code = 127 if isinstance(e, FileNotFoundError) else 126
        message = f"cannot run {command[0]!r}: {e.strerror or e}"
        print(f"nsml: {message}", file=sys.stderr, flush=True)
        _write_exit(exit_file, code, None, message)
        return code
    _write_started(exit_file, proc.pid)
    rc = proc.wait()
    sig = -rc if rc < 0 else None
    code = 128 + sig if sig is not None else rc
    sys.stdout.flush()
    sys.stderr.flush()
    _write_exit(exit_file, code, sig, None)
    _kill_leftovers()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
