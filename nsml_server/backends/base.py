"""The execution-backend API: what the NSML server asks of whatever runs its workloads.

Notebook servers and training sessions are described by a :class:`RunSpec` and handed to an
:class:`ExecutionBackend`, which returns a *handle* (an opaque string) to query, stop and
remove the run later. Two backends implement it: Docker (isolated containers; the default when
an engine answers) and local processes (no isolation; for machines without Docker).

Everything here is plain data and pure functions; the backends do the I/O.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import enum
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "BackendError",
    "ExecResult",
    "ExecutionBackend",
    "GPURuntimeMissing",
    "ImageNotFound",
    "Mount",
    "NameConflict",
    "RunNotFound",
    "RunSpec",
    "RunState",
    "RunStatus",
    "gpu_env",
]

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


class BackendError(Exception):
    """A run could not be started or handled.

    Attributes:
        message: a short sentence for users saying what happened and what to do.
        reason: a stable machine-readable code for API answers (``{"message", "reason"}``).
    """

    reason = "backend"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class ImageNotFound(BackendError):
    """The image is not on the node's engine (and there is no registry to pull from)."""

    reason = "image_not_found"


class GPURuntimeMissing(BackendError):
    """GPUs were requested from an engine that cannot give them (no NVIDIA runtime)."""

    reason = "gpu_runtime_missing"


class NameConflict(BackendError):
    """A run with the same name already exists."""

    reason = "name_conflict"


class RunNotFound(BackendError):
    """No run has this handle (never started, or removed)."""

    reason = "not_found"


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path made visible to the run.

    Attributes:
        source: absolute path on the node.
        target: absolute path the run sees.
        read_only: refuse writes (enforced by Docker; not by the local backend).
    """

    source: str
    target: str
    read_only: bool = True

    def __post_init__(self) -> None:
        for what, path in (("source", self.source), ("target", self.target)):
            if not path.startswith("/"):
                raise ValueError(f"mount {what} {path!r} must be an absolute path, e.g. /data")


@dataclass(slots=True)
class RunSpec:
    """What to run, with which resources.

    Attributes:
        name: unique name of the run (the container name), ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``.
        image: the container image (ignored by the local backend).
        command: the program and its arguments.
        env: environment variables; the backend's GPU variables override same-named ones.
        workdir: working directory; None: the image's (Docker) or a fresh one (local).
        mounts: host paths to make visible.
        copies: host folders copied into the run before it starts (``source`` on the
            server's machine, ``target`` in the run; ``read_only`` is ignored). Unlike a mount
            this works on a remote engine; the run's writes stay in the run.
        gpu_ids: GPU indices (``"0"``) or UUIDs (``"GPU-..."``) the run may use.
        cpu_limit: CPU cores (fractions allowed); None: unlimited.
        mem_limit_bytes: memory limit in bytes; None: unlimited.
        labels: key/value labels, to find runs again with ``ExecutionBackend.list``.
        network: ``"host"`` (the node's loopback and network, the default) or ``"none"``
            (no network at all: evaluations of submitted models). Only Docker can cut a run
            off; the local backend refuses ``"none"``.
    """

    name: str
    image: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    copies: list[Mount] = field(default_factory=list)
    gpu_ids: list[str] = field(default_factory=list)
    cpu_limit: float | None = None
    mem_limit_bytes: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    network: str = "host"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"run name {self.name!r} is invalid; use 1-128 characters from "
                "[a-zA-Z0-9_.-], starting with a letter or digit, e.g. 'alice-mnist-12'"
            )
        if not self.command:
            raise ValueError(f"run {self.name!r} has an empty command; give the program to run")
        if self.network not in ("host", "none"):
            raise ValueError(f"network {self.network!r} must be 'host' or 'none'")
        if self.cpu_limit is not None and not self.cpu_limit > 0:
            raise ValueError(f"cpu_limit {self.cpu_limit!r} must be > 0 cores, or None")
        if self.mem_limit_bytes is not None and self.mem_limit_bytes < 4 * 1024 * 1024:
            raise ValueError(
                f"mem_limit_bytes {self.mem_limit_bytes!r} must be at least 4 MiB "
                "(4194304), or None"
            )
        for gpu in self.gpu_ids:
            if not (gpu.isdigit() or gpu.startswith(("GPU-", "MIG-"))):
                raise ValueError(
                    f"GPU id {gpu!r} is invalid; use an index like '0' or a UUID like 'GPU-...'"
                )


class RunState(enum.StrEnum):
    """Where a run is in its life, as the backend sees it."""

    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class RunStatus:
    """A run's state as reported by the engine or the operating system.

    Attributes:
        state: created, running, exited, or missing (no such run).
        exit_code: the exit status once exited (128 + N when killed by signal N); None before,
            or when it could not be known.
        oom_killed: the run was killed for exceeding its memory limit.
        started_at: when it started (aware datetime, UTC), if it did.
        finished_at: when it ended (aware datetime, UTC), if it did.
        error: the engine's error message, or why the exit status is unknown.
    """

    state: RunState
    exit_code: int | None = None
    oom_killed: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What a command run inside a run answered: its exit code and output (capped)."""

    exit_code: int
    output: str
    truncated: bool = False


def gpu_env(gpu_ids: Sequence[str], *, container_local: bool) -> dict[str, str]:
    """The GPU environment variables of a run.

    ``NVIDIA_VISIBLE_DEVICES`` names the node's GPUs (``void`` when none, so that an image's
    ``NVIDIA_VISIBLE_DEVICES=all`` cannot expose every GPU). ``CUDA_VISIBLE_DEVICES`` names
    them as the run's CUDA sees them: inside a container the NVIDIA runtime renumbers the
    exposed GPUs from 0, so indices become ``0..n-1`` (*container_local*); UUIDs stay as they
    are; an empty value hides every GPU. ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes CUDA number GPUs
    in NVML's order.
    """
    ids = list(gpu_ids)
    if container_local and all(i.isdigit() for i in ids):
        cuda = [str(n) for n in range(len(ids))]
    else:
        cuda = ids
    return {
        "NVIDIA_VISIBLE_DEVICES": ",".join(ids) if ids else "void",
        "CUDA_VISIBLE_DEVICES": ",".join(cuda),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


class ExecutionBackend(abc.ABC):
    """Runs workloads on one node. All methods but :meth:`describe` are coroutines.

    Handles are opaque strings that stay valid across server restarts. :meth:`stop` and
    :meth:`remove` are idempotent: stopping or removing a run that has ended or is gone is
    not an error.
    """

    kind: str = "abstract"

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the backend can run workloads now."""

    @abc.abstractmethod
    async def start(self, spec: RunSpec) -> str:
        """Start *spec* and return its handle.

        Raises:
            ImageNotFound, GPURuntimeMissing, NameConflict, BackendError.
        """

    @abc.abstractmethod
    async def status(self, handle: str) -> RunStatus:
        """The run's state; ``RunState.MISSING`` for an unknown handle."""

    @abc.abstractmethod
    async def logs(self, handle: str, tail: int | None = None) -> str:
        """Output (stdout and stderr) of the run; the last *tail* lines when given.

        Raises:
            RunNotFound: for an unknown handle.
        """

    @abc.abstractmethod
    async def stop(self, handle: str, grace_s: float = 10.0) -> None:
        """Send SIGTERM, wait up to *grace_s* seconds, then SIGKILL. No-op when not running."""

    @abc.abstractmethod
    async def remove(self, handle: str) -> None:
        """Kill the run if it still runs and delete it with its logs. No-op when missing."""

    @abc.abstractmethod
    async def list(self, labels: Mapping[str, str]) -> builtins.list[str]:
        """Handles of all runs (running or not) carrying every one of *labels*."""

    async def labelled(self, labels: Mapping[str, str]) -> dict[str, dict[str, str]]:
        """Every run carrying all of *labels*, with all its labels (``handle -> labels``)."""
        return {h: dict(labels) for h in await self.list(labels)}

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What this backend is: ``kind``, ``endpoint``, ``has_nvidia_runtime``, ``isolation``."""

    async def close(self) -> None:
        """Release connections and threads; runs keep running."""
        return None

    async def copy_logs(self, handle: str, dest: Path, skip: int = 0, poll_s: float = 0.5) -> int:
        """Append the run's output to *dest* as it comes, after its first *skip* bytes, until
        the run ends; return the bytes appended.

        *skip* lets a caller that already stored part of the output (before a restart) go on
        where it stopped. This default polls :meth:`logs`; backends override it with something
        cheaper (a stream, a file). It returns early only when the run is missing.

        Raises:
            RunNotFound: for an unknown handle.
        """
        written = 0
        while True:
            st = await self.status(handle)
            data = (await self.logs(handle)).encode()
            new = data[skip + written :]
            if new:
                with dest.open("ab") as f:
                    f.write(new)
                written += len(new)
            if st.state in (RunState.EXITED, RunState.MISSING):
                return written
            await asyncio.sleep(poll_s)

    async def exec(
        self, handle: str, command: Sequence[str], timeout_s: float = 60.0
    ) -> ExecResult:
        """Run *command* inside the running run; return its exit code and output.

        Raises:
            BackendError: with reason ``unsupported`` when the backend cannot do it, or
                ``not_running`` when the run is not running.
        """
        raise BackendError(
            f"running a command inside a run needs a Docker engine; the {self.kind} backend "
            "cannot do it",
            reason="unsupported",
        )

    async def read_file(self, handle: str, path: str, limit: int) -> bytes | None:
        """The content of the regular file *path* inside the run (running or exited); None
        when there is no such file.

        Raises:
            BackendError: reason ``too_large`` when it holds more than *limit* bytes, or
                ``unsupported`` when the backend cannot read inside a run.
        """
        raise BackendError(
            f"reading a file inside a run needs a Docker engine; the {self.kind} backend "
            "cannot do it",
            reason="unsupported",
        )

    async def wait(self, handle: str, timeout_s: float, poll_s: float = 0.1) -> RunStatus:
        """Poll until the run is exited or missing, or *timeout_s* passes; return its status."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = await self.status(handle)
            if st.state in (RunState.EXITED, RunState.MISSING) or time.monotonic() >= deadline:
                return st
            await asyncio.sleep(poll_s)
