"""Run workloads as containers on a Docker engine (docker-py), the isolating backend.

Every blocking docker-py call goes through :meth:`DockerBackend._call`: it runs in a thread
pool, at most ``max_concurrency`` at a time, and retries transient failures (connection
errors, timeouts, 429/502/503/504) with jittered exponential backoff. Calls that create
something (create, start) are not retried, so a run is never created twice.

Containers use ``network_mode="host"`` (no container gets an address of its own), or
``"none"`` when the spec asks for no network (evaluations of submitted models); they run
under Docker's ``init`` (so SIGTERM reaches the program and zombies are reaped), and get
``NVIDIA_VISIBLE_DEVICES``/``CUDA_VISIBLE_DEVICES`` for their GPUs. GPU device requests are
added only when the engine reports the ``nvidia`` runtime. Images are never pulled.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import difflib
import functools
import io
import logging
import math
import os
import random
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.tls
import requests.exceptions
from docker.types import DeviceRequest
from docker.types import Mount as DockerMount

from .base import (
    BackendError,
    ExecResult,
    ExecutionBackend,
    GPURuntimeMissing,
    ImageNotFound,
    NameConflict,
    RunNotFound,
    RunSpec,
    RunState,
    RunStatus,
    gpu_env,
)

__all__ = ["ContainerArgs", "DockerBackend", "container_args", "parse_docker_time"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ENDPOINT = "unix:///var/run/docker.sock"
_TRANSIENT_STATUS = {429, 502, 503, 504}
#: Output of ``exec`` kept (the tail beyond it is dropped).
EXEC_OUTPUT_MAX = 1 << 20
_NO_TIME = "0001-01-01T00:00:00Z"
_STATES = {
    "created": RunState.CREATED,
    "running": RunState.RUNNING,
    "paused": RunState.RUNNING,
    "restarting": RunState.RUNNING,
    "removing": RunState.EXITED,
    "exited": RunState.EXITED,
    "dead": RunState.EXITED,
}


# ---------------------------------------------------------------------------------------------
# Pure builders


@dataclass(frozen=True)
class ContainerArgs:
    """Keyword arguments for docker-py: ``create_container(**create, host_config=...)`` with
    the host config built from ``create_host_config(**host_config)``."""

    create: dict[str, Any]
    host_config: dict[str, Any]


def container_args(spec: RunSpec, *, nvidia_runtime: bool, init: bool = True) -> ContainerArgs:
    """Translate *spec* into docker-py arguments (pure: no engine is asked).

    Args:
        spec: the run.
        nvidia_runtime: the engine has the ``nvidia`` runtime; only then are GPU device
            requests added (engines without it fail at container start otherwise).
        init: run Docker's init as PID 1. An image whose entrypoint is tini (the notebook
            image, Jupyter's docker-stacks) then runs its tini as PID 2, which warns on every
            start unless it may adopt orphans as a child subreaper: ``TINI_SUBREAPER`` lets
            it (the image's own setting wins).
    """
    env = dict(spec.env)
    if init:
        env.setdefault("TINI_SUBREAPER", "1")
    env.update(gpu_env(spec.gpu_ids, container_local=True))
    create: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command),
        "name": spec.name,
        "environment": env,
        "labels": dict(spec.labels),
        "detach": True,
    }
    if spec.workdir:
        create["working_dir"] = spec.workdir
    host: dict[str, Any] = {
        "network_mode": spec.network,
        "init": init,
        "mounts": [
            DockerMount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
            for m in spec.mounts
        ],
    }
    if spec.mem_limit_bytes is not None:
        host["mem_limit"] = spec.mem_limit_bytes
        host["memswap_limit"] = spec.mem_limit_bytes  # no swap beyond the limit
    if spec.cpu_limit is not None:
        host["nano_cpus"] = round(spec.cpu_limit * 1e9)
    if nvidia_runtime and spec.gpu_ids:
        host["device_requests"] = [
            DeviceRequest(device_ids=list(spec.gpu_ids), capabilities=[["gpu"]])
        ]
    return ContainerArgs(create=create, host_config=host)


def tls_files(cert_path: str) -> dict[str, Any]:
    """``docker.tls.TLSConfig`` keyword arguments for the files in *cert_path*
    (``cert.pem``, ``key.pem``, ``ca.pem``, as ``DOCKER_CERT_PATH`` holds them)."""
    return {
        "client_cert": (os.path.join(cert_path, "cert.pem"), os.path.join(cert_path, "key.pem")),
        "ca_cert": os.path.join(cert_path, "ca.pem"),
        "verify": True,
    }


class PinnedTLSConfig(docker.tls.TLSConfig):  # type: ignore[misc]
    """``docker.tls.TLSConfig`` whose CA file is the only one trusted.

    docker-py hands the CA to ``requests`` as the session's ``verify``; ``requests`` lets
    ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` from the environment override it on every
    request, so on a machine that sets them (many do) the engine's certificate is checked
    against the public bundle and refused (``CERTIFICATE_VERIFY_FAILED``). With a CA given,
    the client ignores the environment (also its proxy variables: engines are dialled
    directly).
    """

    def configure_client(self, client: Any) -> None:
        super().configure_client(client)
        if self.verify and self.ca_cert:
            client.trust_env = False


def remote_tls(url: str, cert_path: str | None) -> Any:
    """The TLS settings for a node's engine at *url*: a ``tcp://`` or ``https://`` engine uses
    the client certificate in *cert_path* (``$DOCKER_CERT_PATH``) when one is given; a Unix
    socket, or no certificate folder, none."""
    if cert_path and url.startswith(("tcp://", "https://")):
        return PinnedTLSConfig(**tls_files(cert_path))
    return None


def folder_tar(source: str, target: str) -> bytes:
    """A tar of the folder *source* placed at *target* (absolute), writable by any user.

    The image's user is not known here (a name or a number), so directories are 0777 and
    files 0666 (0777 when executable): the run can change its copy, as with a mount.
    """
    buf = io.BytesIO()
    base = target.strip("/")
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for dirpath, dirs, files in os.walk(source):
            dirs.sort()
            rel = os.path.relpath(dirpath, source)
            arc = base if rel == "." else f"{base}/{rel}"
            info = tarfile.TarInfo(arc)
            info.type, info.mode = tarfile.DIRTYPE, 0o777
            tar.addfile(info)
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue  # snapshots hold regular files only
                info = tarfile.TarInfo(f"{arc}/{name}")
                info.size = st.st_size
                info.mode = 0o777 if st.st_mode & 0o111 else 0o666
                info.mtime = int(st.st_mtime)
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    return buf.getvalue()


def _put_archive(api: docker.APIClient, *, cid: str, data: bytes) -> Any:
    return api.put_archive(cid, "/", data)


def parse_docker_time(value: str | None) -> datetime | None:
    """Parse the engine's RFC 3339 times (nanoseconds, ``Z``); None for the zero time."""
    if not value or value.startswith("0001-01-01"):
        return None
    text = value.replace("Z", "+00:00")
    if "." in text:
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        log.debug("unparsable time from the Docker engine: %r", value)
        return None


def _is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the engine was unreachable or overloaded, not a refusal."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        if isinstance(seen, docker.errors.APIError):
            return seen.status_code in _TRANSIENT_STATUS
        seen = seen.__cause__ or seen.__context__
    return False


def _explanation(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc)


# ---------------------------------------------------------------------------------------------
# The backend


class DockerBackend(ExecutionBackend):
    """Containers on one Docker engine.

    Args:
        base_url: the engine, e.g. ``unix:///var/run/docker.sock`` or ``tcp://node-b:2376``;
            None: ``DOCKER_HOST`` (with ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH``) or the local
            socket.
        tls: a ``docker.tls.TLSConfig`` (or True) for TCP engines.
        timeout_s: HTTP timeout per engine call, in seconds.
        max_concurrency: engine calls in flight at once (and threads used).
        retries: extra attempts for a transient failure of a call that creates nothing.
        backoff_s: first retry delay bound; each retry doubles it (up to 8 s), full jitter.
        nvidia_runtime: override what the engine reports about its ``nvidia`` runtime
            (None: ask the engine once and cache the answer).
        init: run Docker's init as PID 1 of every container.
        rng: randomness for the backoff jitter (injectable for tests).
        logger: where to log.
    """

    kind = "docker"

    def __init__(
        self,
        base_url: str | None = None,
        tls: Any = None,
        *,
        timeout_s: float = 60.0,
        max_concurrency: int = 8,
        retries: int = 3,
        backoff_s: float = 0.25,
        nvidia_runtime: bool | None = None,
        init: bool = True,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency {max_concurrency!r} must be at least 1")
        self.base_url = base_url
        self.endpoint = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_ENDPOINT
        self._tls = tls
        self._timeout_s = timeout_s
        self._max_concurrency = max_concurrency
        self._retries = retries
        self._backoff_s = backoff_s
        self._nvidia_runtime = nvidia_runtime
        self._init = init
        self._rng = rng or random.Random()
        self._log = logger or log
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        self._server_version: str | None = None
        self._stream_api: docker.APIClient | None = None

    # -- the one wrapper around docker-py ----------------------------------------------------

    @property
    def client(self) -> docker.DockerClient:
        """The docker-py client, created on first use (blocking: call from a thread)."""
        with self._client_lock:
            if self._client is None:
                if self.base_url is None:
                    self._client = docker.from_env(timeout=self._timeout_s)
                else:
                    self._client = docker.DockerClient(
                        base_url=self.base_url,
                        tls=self._tls or False,
                        timeout=self._timeout_s,
                        version="auto",
                    )
            return self._client

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem = asyncio.Semaphore(self._max_concurrency)
            self._sem_loop = loop
        return self._sem

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self._max_concurrency, thread_name_prefix="nsml-docker"
            )
        return self._pool

    async def _call(
        self,
        what: str,
        fn: Callable[[docker.APIClient], T],
        *,
        idempotent: bool = True,
        retries: int | None = None,
    ) -> T:
        """Run ``fn(api)`` in the thread pool under the semaphore; retry transient errors.

        Only *idempotent* calls are retried, up to *retries* times (default: the backend's).
        """
        loop = asyncio.get_running_loop()
        attempts = (self._retries if retries is None else retries) if idempotent else 0
        for attempt in range(attempts + 1):
            try:
                async with self._semaphore():
                    return await loop.run_in_executor(
                        self._executor(), functools.partial(self._invoke, fn)
                    )
            except Exception as e:
                if attempt >= attempts or not _is_transient(e):
                    raise
                bound = min(8.0, self._backoff_s * 2**attempt)
                delay = self._rng.uniform(0, bound)
                self._log.warning(
                    "docker %s at %s failed (%s); retry %d/%d in %.2fs",
                    what,
                    self.endpoint,
                    e,
                    attempt + 1,
                    attempts,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _invoke(self, fn: Callable[[docker.APIClient], T]) -> T:
        return fn(self.client.api)

    @contextlib.contextmanager
    def _engine_errors(self, what: str) -> Iterator[None]:
        """Turn docker-py and HTTP errors that no caller handled into :class:`BackendError`."""
        try:
            yield
        except BackendError:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            if _is_transient(e):
                raise BackendError(
                    f"the Docker engine at {self.endpoint} does not answer ({what}: {e})",
                    reason="engine_unavailable",
                ) from e
            raise BackendError(
                f"the Docker engine at {self.endpoint} failed to {what}: {_explanation(e)}",
                reason="engine_error",
            ) from e

    # -- engine facts ------------------------------------------------------------------------

    async def ping(self) -> bool:
        """True when the engine answers; also learns (once) whether it has the NVIDIA runtime."""
        try:
            await self._call("ping", lambda api: api.ping(), retries=0)
            await self.has_nvidia_runtime()
        except Exception as e:
            self._log.debug("Docker engine at %s does not answer: %s", self.endpoint, e)
            return False
        return True

    async def has_nvidia_runtime(self) -> bool:
        """Whether the engine lists the ``nvidia`` runtime (``docker info``), cached."""
        with self._engine_errors("read its info"):
            if self._nvidia_runtime is None:
                info = await self._call("info", lambda api: api.info())
                runtimes = info.get("Runtimes") or {}
                self._nvidia_runtime = "nvidia" in runtimes
                self._server_version = info.get("ServerVersion")
                self._log.info(
                    "Docker engine %s at %s: runtimes %s%s",
                    self._server_version,
                    self.endpoint,
                    ", ".join(sorted(runtimes)) or "none",
                    "" if self._nvidia_runtime else " (no nvidia: GPUs are passed as env only)",
                )
            return self._nvidia_runtime

    def describe(self) -> dict[str, Any]:
        """Kind, endpoint, NVIDIA runtime (None until the engine was asked), isolation."""
        return {
            "kind": self.kind,
            "endpoint": self.endpoint,
            "has_nvidia_runtime": self._nvidia_runtime,
            "isolation": True,
            "server_version": self._server_version,
        }

    # -- runs --------------------------------------------------------------------------------

    async def _image_missing(self, image: str) -> ImageNotFound:
        try:
            images = await self._call("images", lambda api: api.images())
            tags = [t for i in images for t in (i.get("RepoTags") or []) if t != "<none>:<none>"]
        except Exception:
            tags = []
        return ImageNotFound(
            f"image {image!r} is not on the Docker engine at {self.endpoint}, and images are "
            "never pulled (there is no registry). Build or load it on this node first, e.g. "
            f"`hub_config/images/build.sh --image {image}` or `docker load -i IMAGE.tar`. "
            f"Images present: {closest_first(image, tags)}."
        )

    async def start(self, spec: RunSpec) -> str:
        """Create and start a container for *spec*; return its id.

        Raises:
            ImageNotFound: the image is not on the engine.
            NameConflict: a container with this name exists.
            GPURuntimeMissing: the engine could not give the container its GPUs.
            BackendError: any other refusal by the engine, or no engine answers.
        """
        with self._engine_errors("start a container"):
            nvidia = await self.has_nvidia_runtime()
            try:
                await self._call("inspect image", lambda api: api.inspect_image(spec.image))
            except docker.errors.ImageNotFound:
                raise await self._image_missing(spec.image) from None
            if spec.gpu_ids and not nvidia:
                self._log.info(
                    "%s: engine at %s has no NVIDIA runtime; GPUs %s passed as env only",
                    spec.name,
                    self.endpoint,
                    ",".join(spec.gpu_ids),
                )
            cid = await self._create(
                spec, container_args(spec, nvidia_runtime=nvidia, init=self._init)
            )
            await self._copy_in(spec, cid)
            await self._start_created(spec, cid)
            self._log.info("%s: started container %s on %s", spec.name, cid[:12], self.endpoint)
            return cid

    async def _create(self, spec: RunSpec, args: ContainerArgs) -> str:
        """``docker create``; never retried, so that no run is created twice."""

        def create(api: docker.APIClient) -> dict[str, Any]:
            host_config = api.create_host_config(**args.host_config)
            result: dict[str, Any] = api.create_container(host_config=host_config, **args.create)
            return result

        try:
            created = await self._call("create", create, idempotent=False)
        except docker.errors.ImageNotFound:
            raise await self._image_missing(spec.image) from None
        except docker.errors.APIError as e:
            if e.status_code == 409:
                raise NameConflict(
                    f"a container named {spec.name!r} already exists on {self.endpoint}; "
                    "remove it or choose another name"
                ) from e
            raise BackendError(
                f"the Docker engine at {self.endpoint} refused to create {spec.name}: "
                f"{_explanation(e)}"
            ) from e
        for warning in created.get("Warnings") or []:
            self._log.warning("%s: Docker engine warns: %s", spec.name, warning)
        return str(created["Id"])

    async def _copy_in(self, spec: RunSpec, cid: str) -> None:
        """Copy ``spec.copies`` into the created container (one tar over the engine's API, so
        a remote engine gets them too); on failure the container is removed."""
        for c in spec.copies:
            try:
                data = await asyncio.to_thread(folder_tar, c.source, c.target)
                put: Callable[[docker.APIClient], Any] = functools.partial(
                    _put_archive, cid=cid, data=data
                )
                await self._call("copy in", put, idempotent=False)
            except Exception as e:
                await self._remove_quietly(cid)
                raise BackendError(
                    f"could not copy {c.source} to {c.target} in {spec.name}: {_explanation(e)}"
                ) from e

    async def _start_created(self, spec: RunSpec, cid: str) -> None:
        """``docker start``; on failure the container is removed and the error explained."""
        try:
            await self._call("start", lambda api: api.start(cid), idempotent=False)
        except Exception as e:
            await self._remove_quietly(cid)
            text = _explanation(e)
            if "could not select device driver" in text:
                raise GPURuntimeMissing(
                    f"{spec.name} asked for GPUs {','.join(spec.gpu_ids)}, but the Docker "
                    f"engine at {self.endpoint} lacks the NVIDIA runtime ({text}). Install the "
                    "NVIDIA Container Toolkit on this node and restart Docker "
                    "(`nvidia-ctk runtime configure --runtime=docker`), or run without GPUs."
                ) from e
            raise BackendError(f"container {spec.name} did not start: {text}") from e

    async def _remove_quietly(self, handle: str) -> None:
        try:
            await self.remove(handle)
        except Exception as e:
            self._log.warning("could not remove container %s: %s", handle[:12], e)

    async def status(self, handle: str) -> RunStatus:
        """The container's state from ``docker inspect``; MISSING when it does not exist."""
        with self._engine_errors("inspect a container"):
            try:
                info = await self._call("inspect", lambda api: api.inspect_container(handle))
            except docker.errors.NotFound:
                return RunStatus(state=RunState.MISSING)
            st = info.get("State") or {}
            state = _STATES.get(str(st.get("Status", "")), RunState.EXITED)
            started = parse_docker_time(st.get("StartedAt"))
            finished = parse_docker_time(st.get("FinishedAt"))
            if started and finished and finished < started:
                # The engine stamps StartedAt after a very short process may already have
                # exited (seen: FinishedAt 0.4 ms before StartedAt): it ran for ~0 s.
                finished = started
            return RunStatus(
                state=state,
                exit_code=int(st["ExitCode"]) if state is RunState.EXITED else None,
                oom_killed=bool(st.get("OOMKilled")),
                started_at=started,
                finished_at=finished,
                error=st.get("Error") or None,
            )

    async def logs(self, handle: str, tail: int | None = None) -> str:
        """stdout and stderr of the container, interleaved as the engine stored them."""
        with self._engine_errors("read a container's logs"):
            try:
                data = await self._call(
                    "logs",
                    lambda api: api.logs(
                        handle, stdout=True, stderr=True, tail="all" if tail is None else tail
                    ),
                )
            except docker.errors.NotFound:
                raise RunNotFound(f"no container {handle!r} on {self.endpoint}") from None
            return bytes(data).decode("utf-8", "replace")

    async def stop(self, handle: str, grace_s: float = 10.0) -> None:
        """``docker stop -t grace`` (SIGTERM, then SIGKILL); a missing container is fine."""
        with self._engine_errors("stop a container"):
            grace = max(0, math.ceil(grace_s))
            try:
                await self._call("stop", lambda api: api.stop(handle, timeout=grace))
            except docker.errors.NotFound:
                return

    async def remove(self, handle: str) -> None:
        """``docker rm -f -v``; a missing container (or one already being removed) is fine."""
        with self._engine_errors("remove a container"):
            try:
                await self._call(
                    "remove", lambda api: api.remove_container(handle, force=True, v=True)
                )
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as e:
                if e.status_code == 409 and "already in progress" in _explanation(e):
                    return
                raise

    async def list(self, labels: Mapping[str, str]) -> builtins.list[str]:
        """Ids of all containers (running or not) carrying every one of *labels*."""
        with self._engine_errors("list containers"):
            filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
            found = await self._call("list", lambda api: api.containers(all=True, filters=filters))
            return [str(c["Id"]) for c in found]

    async def labelled(self, labels: Mapping[str, str]) -> dict[str, dict[str, str]]:
        """Every container (running or not) carrying all of *labels*, with all its labels."""
        with self._engine_errors("list containers"):
            filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
            found = await self._call("list", lambda api: api.containers(all=True, filters=filters))
            return {str(c["Id"]): dict(c.get("Labels") or {}) for c in found}

    # -- long calls: log streams and exec, each in a thread of its own ------------------------

    def _long_api(self) -> docker.APIClient:
        """A client without a read timeout (a quiet run sends nothing for hours) and with a
        connection pool for many concurrent streams; long calls never take a slot of the
        bounded pool that short calls use."""
        with self._client_lock:
            if self._stream_api is None:
                if self.base_url is None:
                    kwargs = docker.utils.kwargs_from_env()
                    if "base_url" not in kwargs:
                        # The local socket (no DOCKER_HOST): DOCKER_CERT_PATH, when set, holds
                        # the remote engines' client certificate (BackendPool), not TLS for
                        # this socket; with it docker-py refused to stream ("If using TLS, the
                        # base_url argument must be provided") and local runs had no logs.
                        kwargs.pop("tls", None)
                else:
                    kwargs = {"base_url": self.base_url, "tls": self._tls or False}
                self._stream_api = docker.APIClient(
                    timeout=None, version="auto", max_pool_size=256, **kwargs
                )
            return self._stream_api

    async def _in_own_thread(
        self, what: str, fn: Callable[[dict[str, Any]], T], cancel: Callable[[Any], None]
    ) -> T:
        """Run ``fn(holder)`` in a new daemon thread; on cancellation set
        ``holder["cancelled"]`` (a ``threading.Event`` that *fn* checks before each write),
        call ``cancel(holder["stream"])`` (when set) so that a blocking read ends, and wait
        briefly for the thread to finish, so that nothing is written after the caller moved on.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        holder: dict[str, Any] = {"cancelled": threading.Event()}

        def deliver(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        def body() -> None:
            try:
                result = fn(holder)
            except BaseException as e:
                loop.call_soon_threadsafe(deliver, False, e)
            else:
                loop.call_soon_threadsafe(deliver, True, result)

        threading.Thread(target=body, name=f"nsml-docker-{what}", daemon=True).start()
        try:
            return await fut
        except asyncio.CancelledError:
            holder["cancelled"].set()
            stream = holder.get("stream")
            if stream is not None:
                with contextlib.suppress(Exception):
                    cancel(stream)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(fut), 5.0)
            raise

    async def copy_logs(self, handle: str, dest: Path, skip: int = 0, poll_s: float = 0.5) -> int:
        """Follow the container's output (``docker logs -f``) into *dest*, past *skip* bytes.

        Returns when the output ends: the container exited, or the stream broke (call
        :meth:`status` to tell which and call again to go on).
        """

        def pump(holder: dict[str, Any]) -> int:
            api = self._long_api()
            try:
                stream = api.logs(handle, stdout=True, stderr=True, stream=True, follow=True)
            except docker.errors.NotFound:
                raise RunNotFound(f"no container {handle!r} on {self.endpoint}") from None
            holder["stream"] = stream
            cancelled: threading.Event = holder["cancelled"]
            written, to_skip = 0, skip
            with dest.open("ab") as out:
                for chunk in stream:
                    if cancelled.is_set():
                        break
                    if to_skip:
                        if len(chunk) <= to_skip:
                            to_skip -= len(chunk)
                            continue
                        chunk, to_skip = chunk[to_skip:], 0
                    out.write(chunk)
                    out.flush()
                    written += len(chunk)
            return written

        with self._engine_errors("follow a container's logs"):
            return await self._in_own_thread("logs", pump, lambda s: s.close())

    async def exec(
        self, handle: str, command: Sequence[str], timeout_s: float = 60.0
    ) -> ExecResult:
        """``docker exec`` *command* in the running container; output capped at 1 MiB.

        Raises:
            BackendError: ``not_running`` when the container does not run, ``timeout`` when
                the command did not end within *timeout_s* (it is left running).
        """

        def run(holder: dict[str, Any]) -> ExecResult:
            api = self._long_api()
            try:
                ex = api.exec_create(handle, list(command), stdout=True, stderr=True)
            except docker.errors.NotFound:
                raise RunNotFound(f"no container {handle!r} on {self.endpoint}") from None
            except docker.errors.APIError as e:
                if e.status_code == 409:
                    raise BackendError(
                        "the session's container is not running", reason="not_running"
                    ) from e
                raise
            stream = api.exec_start(ex["Id"], stream=True)
            holder["stream"] = stream
            kept = bytearray()
            truncated = False
            for chunk in stream:
                kept += chunk
                if len(kept) > EXEC_OUTPUT_MAX:
                    del kept[: len(kept) - EXEC_OUTPUT_MAX]
                    truncated = True
            code = api.exec_inspect(ex["Id"]).get("ExitCode")
            return ExecResult(
                exit_code=-1 if code is None else int(code),
                output=bytes(kept).decode("utf-8", "replace"),
                truncated=truncated,
            )

        def cancel(stream: Any) -> None:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

        with self._engine_errors("run a command in a container"):
            try:
                return await asyncio.wait_for(self._in_own_thread("exec", run, cancel), timeout_s)
            except TimeoutError:
                raise BackendError(
                    f"the command did not end within {timeout_s:g}s (it may still run)",
                    reason="timeout",
                ) from None

    async def read_file(self, handle: str, path: str, limit: int) -> bytes | None:
        """``docker cp`` of one regular file out of the container (also once it exited).

        Raises:
            BackendError: reason ``too_large`` over *limit* bytes, ``not_a_file`` when *path*
                is a folder, a link or a device; engine errors as elsewhere.
        """

        def get(api: docker.APIClient) -> bytes | None:
            try:
                stream, stat = api.get_archive(handle, path)
            except docker.errors.NotFound:
                return None
            if not stat or int(stat.get("size", 0)) > limit:
                raise BackendError(
                    f"{path} in the run holds more than {limit} bytes", reason="too_large"
                )
            data = bytearray()
            for chunk in stream:
                data += chunk
                if len(data) > limit + 1024 * 1024:  # the tar headers are small
                    raise BackendError(
                        f"{path} in the run holds more than {limit} bytes", reason="too_large"
                    )
            with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
                member = tar.next()
                if member is None or not member.isreg():
                    raise BackendError(f"{path} in the run is not a file", reason="not_a_file")
                f = tar.extractfile(member)
                assert f is not None
                return f.read(limit + 1)[:limit]

        with self._engine_errors("copy a file out of a container"):
            return await self._call("copy out", get)

    async def close(self) -> None:
        """Close the HTTP connections and the thread pool; containers keep running."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
        stream_api, self._stream_api = self._stream_api, None
        if stream_api is not None:
            stream_api.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def closest_first(image: str, tags: list[str], shown: int = 10) -> str:
    """*tags* as a list for a person, the names closest to *image* first (a typo, another
    tag of the same repository), at most *shown* of them and how many more there are."""
    if not tags:
        return "none"
    ranked = sorted(set(tags), key=lambda t: (-difflib.SequenceMatcher(None, image, t).ratio(), t))
    more = len(ranked) - shown
    return ", ".join(ranked[:shown]) + (f" and {more} more" if more > 0 else "")
