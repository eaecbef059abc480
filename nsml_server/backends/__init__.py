"""Execution backends: one API (:class:`ExecutionBackend`) over Docker and local processes.

:func:`select_backend` picks Docker when an engine answers, else the local-process backend,
which isolates nothing and says so loudly.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from .base import (
    BackendError,
    ExecResult,
    ExecutionBackend,
    GPURuntimeMissing,
    ImageNotFound,
    Mount,
    NameConflict,
    RunNotFound,
    RunSpec,
    RunState,
    RunStatus,
    gpu_env,
)
from .docker import DockerBackend, container_args
from .local import ISOLATION_WARNING, LocalProcessBackend

__all__ = [
    "ISOLATION_WARNING",
    "BackendError",
    "DockerBackend",
    "ExecResult",
    "ExecutionBackend",
    "GPURuntimeMissing",
    "ImageNotFound",
    "LocalProcessBackend",
    "Mount",
    "NameConflict",
    "RunNotFound",
    "RunSpec",
    "RunState",
    "RunStatus",
    "container_args",
    "gpu_env",
    "select_backend",
]


async def select_backend(
    docker_url: str | None,
    state_dir: Path,
    log: logging.Logger,
    *,
    ping_timeout_s: float = 5.0,
) -> ExecutionBackend:
    """Docker when the engine at *docker_url* answers within *ping_timeout_s*, else local.

    Args:
        docker_url: the engine; None: ``DOCKER_HOST`` or the local socket.
        state_dir: the local-process backend's folder (state file and logs), used only when
            falling back.
        log: where to log the choice (a WARNING when falling back).
        ping_timeout_s: how long to wait for the engine to answer.
    """
    docker_backend = DockerBackend(docker_url, logger=log)
    try:
        answered = await asyncio.wait_for(docker_backend.ping(), ping_timeout_s)
    except TimeoutError:
        answered = False
    if answered:
        log.info(
            "execution backend: Docker engine at %s (NVIDIA runtime: %s)",
            docker_backend.endpoint,
            "yes" if docker_backend.describe()["has_nvidia_runtime"] else "no",
        )
        return docker_backend
    await docker_backend.close()
    log.warning(
        "no Docker engine answered at %s within %.1fs; falling back to the local-process "
        "backend in %s",
        docker_backend.endpoint,
        ping_timeout_s,
        state_dir,
    )
    return LocalProcessBackend(state_dir, logger=log)
