"""``NSMLSpawner(DockerSpawner)``: notebook servers placed on the cluster by the NSML scheduler.

A spawn goes: validate ``user_options`` (a 400 that lists the valid choices, before anything is
allocated) -> ask the NSML server for a placement for the user (``holder`` ``notebook`` or
``notebook:NAME``) and wait in its queue, reporting the position through :meth:`progress` ->
create the container on the chosen node's Docker engine with exactly the allocated GPUs, hard
memory and CPU limits, and the datasets asked for -> wait until the server answers (a container
that ends first fails the start with the reason, e.g. out of memory) -> return its address.

Every user has a persistent home (:attr:`NSMLSpawner.home_volume`): by default a Docker volume
on the node, labelled with the deployment and the user, mounted at ``/home/jovyan`` and kept
when the server stops, is culled or is stopped by an admin (the container is removed, the
volume is not). The spawner remembers the node that holds it and asks the scheduler for that
node; a server placed elsewhere says why in its progress. A home on a shared filesystem (NFS)
is a path that every node mounts. Only an operator removes a home (``docker volume rm``, or
:attr:`NSMLSpawner.remove_home_on_delete` when a user is deleted).

Stopping (or finding the container gone or exited) releases the allocation, idempotently and
with retries. The placement and the node are kept in the spawner's state, so a hub restart
finds running servers with their GPUs still allocated. A container killed at its memory limit
is reported as such: in the hub's log, in the server's state (``last_exit``) and on the next
spawn form.

Containers use the host's network (no private-range address; engines run with
``--bridge=none``), so each server listens on a free port of its node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import docker
import requests.exceptions
from docker.errors import APIError, ImageNotFound, NotFound
from dockerspawner import DockerSpawner
from dockerspawner.dockerspawner import _deep_merge
from jupyterhub.spawner import SpawnException
from jupyterhub.utils import random_port
from tornado.httpclient import HTTPClientError, HTTPRequest
from traitlets import (
    Bool,
    Dict,
    Enum,
    Float,
    Integer,
    List,
    TraitError,
    Unicode,
    default,
    validate,
)

from gpu_scheduler.probe import parse_memory_mib
from nsml_server.images import allowed_images_from_env

from .client import (
    Infeasible,
    NSMLClient,
    NSMLError,
    NSMLUnavailable,
    QueueTimeout,
    wait_for_placement,
)
from .options import (
    Choices,
    ClusterLimits,
    NotebookOptions,
    OptionsError,
    cluster_limits,
    format_mib,
    options_from_form,
    render_form,
    validate_options,
)
from .spec import (
    HOME_TARGET,
    Allocation,
    ContainerSettings,
    Engine,
    Home,
    LastExit,
    MountsNotReady,
    NodeUnreachable,
    PinnedTLSConfig,
    dataset_mounts,
    describe_exit,
    engine_url_for,
    holder_for,
    home_for,
    home_init_container,
    home_labels,
    home_news,
    node_lost_exit,
    notebook_container,
    server_host,
    tls_files,
)

DEFAULT_IMAGE = "jupyter-nsml/singleuser:latest"
#: What a node's engine that does not answer raises (docker-py raises a bare DockerException
#: when it cannot even learn the engine's API version); its APIError answers are not these.
ENGINE_SILENT = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    docker.errors.DockerException,
)
QUEUE_POLL_S = 10.0  # one long poll of the placement API while waiting in the queue
T = TypeVar("T")

# Releases handed off by clear_state() (a synchronous hook) keep running here.
_BACKGROUND: set[asyncio.Task[Any]] = set()


async def _render_options_form(spawner: NSMLSpawner) -> str:
    """``Spawner.options_form``: the GPU / image / datasets / limits form."""
    return await spawner.render_options_form()


def _options_from_form(
    formdata: dict[str, list[str]], spawner: NSMLSpawner | None = None
) -> dict[str, Any]:
    """``Spawner.options_from_form``: form fields -> ``user_options``, checked without the
    cluster (the full check runs when the server starts). A ValueError re-shows the form."""
    options = options_from_form(formdata)
    if spawner is not None:
        validate_options(options, spawner.choices(cluster=None))
    return options


def _options_applied_in_start(spawner: NSMLSpawner, user_options: dict[str, Any]) -> None:
    """``Spawner.apply_user_options``: NSMLSpawner validates and applies ``user_options`` in
    ``start()``, where a bad value becomes a 400 that lists the valid choices."""


class NSMLSpawner(DockerSpawner):  # type: ignore[misc]
    """Notebook servers with GPUs, placed by the NSML scheduler, in containers on its nodes."""

    # ---- DockerSpawner defaults for the cluster ----------------------------------------------

    @default("image")
    def _default_image(self) -> str:
        return os.environ.get("NSML_NOTEBOOK_IMAGE", DEFAULT_IMAGE)

    @default("allowed_images")
    def _default_allowed_images(self) -> dict[str, str]:
        # The same list the NSML server enforces for sessions and placements: the hub config
        # sets NSML_ALLOWED_IMAGES for both; unset, the hub's own notebook image.
        if os.environ.get("NSML_ALLOWED_IMAGES", "").strip():
            return {p: p for p in allowed_images_from_env(os.environ)}
        image = getattr(self, "_configured_image", None) or self.image
        return {image: image}

    @default("network_name")
    def _default_network_name(self) -> str:
        return "host"

    @default("use_internal_ip")
    def _default_use_internal_ip(self) -> bool:
        return True

    @default("pull_policy")
    def _default_pull_policy(self) -> str:
        return "never"

    @default("remove")
    def _default_remove(self) -> bool:
        return True

    @default("poll_interval")
    def _default_poll_interval(self) -> int:
        # A server that died holds GPUs until a poll notices; notice it soon.
        return 10

    @default("options_form")
    def _default_options_form(self) -> Callable[[NSMLSpawner], Any]:
        return _render_options_form

    @default("options_from_form")
    def _default_options_from_form(self) -> Callable[..., dict[str, Any]]:
        return _options_from_form

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Callable[..., None]:
        return _options_applied_in_start

    # ---- configuration -----------------------------------------------------------------------

    nsml_api_url = Unicode(
        help="""URL of the NSML API as seen from inside a notebook container, given to the
        `nsml` client as NSML_API_URL (with the server's own token as NSML_TOKEN). Default:
        $NSML_API_URL_FOR_SERVERS, set by the hub config to the service's own address
        (containers share the host's network). Empty: the variable is not set.""",
    ).tag(config=True)

    @default("nsml_api_url")
    def _default_nsml_api_url(self) -> str:
        return os.environ.get("NSML_API_URL_FOR_SERVERS", "")

    scheduler_url = Unicode(
        help="""URL of the NSML API as the hub reaches it, for placements. Default:
        $NSML_SPAWNER_API_URL, else $NSML_API_URL_FOR_SERVERS (the service's direct address,
        e.g. http://127.0.0.1:8090/services/nsml/api/).""",
    ).tag(config=True)

    @default("scheduler_url")
    def _default_scheduler_url(self) -> str:
        return os.environ.get("NSML_SPAWNER_API_URL") or os.environ.get(
            "NSML_API_URL_FOR_SERVERS", ""
        )

    scheduler_token = Unicode(
        help="""Hub API token of the trusted service `nsml-spawner`, which may place resources
        on a user's behalf. Default: $NSML_SPAWNER_TOKEN (the hub config sets it).""",
    ).tag(config=True)

    @default("scheduler_token")
    def _default_scheduler_token(self) -> str:
        return os.environ.get("NSML_SPAWNER_TOKEN", "")

    queue_timeout = Float(
        60.0,
        help="""Seconds a spawn waits in the NSML queue for its GPUs before giving up with
        "no capacity" (HTTP 503; the request is cancelled). Default 60. It is cut to
        Spawner.start_timeout minus 10 s, since the hub cancels a start after that; it does
        not bound the time the container then takes to start.""",
    ).tag(config=True)

    @validate("queue_timeout")
    def _validate_queue_timeout(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not value > 0:
            raise TraitError(f"queue_timeout={value!r} must be more than 0 seconds, e.g. 60")
        return value

    allow_gpu_sharing = Bool(
        False,
        help="""Let users ask for a share of one GPU (one of gpu_shares, e.g. gpus=0.5); the
        scheduler packs shares onto shared GPUs. Default False: whole GPUs only (the embedded
        config turns it on). Sharing gives no memory isolation between the containers on one
        GPU: a share is a scheduling share, not a hardware limit.""",
    ).tag(config=True)

    gpu_shares = List(
        Float(),
        [0.25, 0.5],
        help="""The shares of one GPU offered in the spawn form (and accepted from the API)
        when allow_gpu_sharing is on, each above 0 and below 1, e.g. [0.25, 0.5]. Default
        [0.25, 0.5]. An empty list accepts any share from 0.001 to 0.999. A bad value is
        refused with the list of valid ones.""",
    ).tag(config=True)

    @validate("gpu_shares")
    def _validate_gpu_shares(self, proposal: Any) -> list[float]:
        shares = [float(v) for v in proposal["value"]]
        for share in shares:
            if not 0 < share < 1 or abs(share * 1000 - round(share * 1000)) > 1e-9:
                raise TraitError(
                    f"gpu_shares: {share!r} is not a share of one GPU; give numbers above 0 "
                    "and below 1 in steps of 0.001, e.g. [0.25, 0.5]"
                )
        return sorted(set(shares))

    home_volume = Unicode(
        "{prefix}-home-{username}",
        help="""Each user's persistent home, mounted read-write at home_mount_path in every
        server of the user and kept when the server stops, is culled, or is stopped by an
        admin. Either a Docker volume name (node-local: made on the node that runs the
        server, labelled nsml.kind=home, nsml.deployment=PREFIX, nsml.user=NAME; the
        scheduler prefers that node next time) or an absolute path on a filesystem that every
        node mounts at that path, e.g. "/mnt/nfs/homes/{username}" (a shared home; no node
        preference). Templates as in DockerSpawner.volumes: {username} is the escaped user
        name (lowercase letters, digits and -XX escapes: never a path separator), {prefix}
        is DockerSpawner.prefix, {servername} the server's name. Default
        "{prefix}-home-{username}", e.g. nsml-nb-home-alice. A new or empty home gets the
        image's own home files and the notebook user (home_uid) as owner. Empty: no home
        (files live and die with the container). Ignored when DockerSpawner.volumes already
        mounts something at home_mount_path.""",
    ).tag(config=True)

    home_mount_path = Unicode(
        HOME_TARGET,
        help="""Where containers see the user's home. Default /home/jovyan, the home of the
        notebook images (docker-stacks and the offline build).""",
    ).tag(config=True)

    home_uid = Integer(
        1000,
        help="""The notebook user's uid (and home_gid its group), who must be able to write
        the home. Default 1000:100, jovyan in the notebook images.""",
    ).tag(config=True)

    home_gid = Integer(100, help="The notebook user's group id. Default 100.").tag(config=True)

    remove_home_on_delete = Bool(
        False,
        help="""Remove a user's home volumes (on every node) when an admin deletes the user
        in the hub. Default False: homes outlive users, and only an operator removes one
        (docker volume rm NAME on the node). Homes on a shared filesystem are never removed
        by the hub.""",
    ).tag(config=True)

    @validate("home_mount_path")
    def _validate_home_mount_path(self, proposal: Any) -> str:
        value = str(proposal["value"])
        try:
            home_for("/x", value)
        except ValueError as e:
            raise TraitError(str(e)) from e
        return value

    max_gpus = Float(
        None,
        allow_none=True,
        help="""Most GPUs one notebook server may ask for. Default None: as many as the
        largest node has (of the model asked for). It does not limit a user's total.""",
    ).tag(config=True)

    default_cpu = Float(
        1.0,
        help="""CPU cores of a server that does not ask (a hard limit; the scheduler reserves
        them on the node). Default 1.""",
    ).tag(config=True)

    max_cpu = Float(
        None,
        allow_none=True,
        help="""Most CPU cores one server may ask for. Default None: as many as the largest
        node has.""",
    ).tag(config=True)

    @validate("default_cpu", "max_cpu", "max_gpus")
    def _validate_positive(self, proposal: Any) -> float | None:
        value = proposal["value"]
        name = proposal["trait"].name
        if value is None and name != "default_cpu":
            return None
        if value is None or not float(value) > 0:
            raise TraitError(f"{name}={value!r} must be a number above 0, e.g. 2")
        return float(value)

    default_memory = Unicode(
        "2G",
        help="""Memory of a server that does not ask, e.g. "2G" or "512M" (binary units): a
        hard limit, no swap beyond it; a server that uses more is stopped by the engine.
        Default "2G".""",
    ).tag(config=True)

    max_memory = Unicode(
        None,
        allow_none=True,
        help="""Most memory one server may ask for, e.g. "64G". Default None: as much as the
        largest node has.""",
    ).tag(config=True)

    @validate("default_memory", "max_memory")
    def _validate_memory(self, proposal: Any) -> str | None:
        value = proposal["value"]
        name = proposal["trait"].name
        if value is None and name == "max_memory":
            return None
        try:
            parse_memory_mib(str(value), name)
        except ValueError as e:
            raise TraitError(str(e)) from e
        return str(value)

    local_node = Unicode(
        help="""Name of the node whose Docker engine is the hub's own (DOCKER_HOST, or the
        local socket). Default: $NSML_NODE_NAME, else this machine's host name, as the NSML
        server names its local node.""",
    ).tag(config=True)

    @default("local_node")
    def _default_local_node(self) -> str:
        return os.environ.get("NSML_NODE_NAME") or socket.gethostname()

    node_docker_urls = Dict(
        value_trait=Unicode(),
        help="""Docker engine URL per node name, when the hub reaches a node's engine at
        another address than the one its agent advertises (e.g. {"node-a":
        "tcp://10.0.0.5:2376"}). TCP engines use TLS from DockerSpawner.tls_config, else
        from the files in $DOCKER_CERT_PATH. Default: none.""",
    ).tag(config=True)

    visible_devices = Enum(
        ["index", "uuid"],
        "index",
        help="""How containers name their GPUs in NVIDIA_VISIBLE_DEVICES and device requests:
        by the node's index ("2,3") or by UUID ("GPU-..."). Default "index"; both name
        the same GPUs when the node's driver numbers them in NVML order.""",
    ).tag(config=True)

    docker_threads = Integer(
        8,
        help="""Threads that run blocking Docker engine calls for all spawners of the hub
        (shared, sized by the first spawner). Default 8.""",
    ).tag(config=True)

    @validate("docker_threads")
    def _validate_docker_threads(self, proposal: Any) -> int:
        value = int(proposal["value"])
        if value < 1:
            raise TraitError(f"docker_threads={value!r} must be at least 1, e.g. 8")
        return value

    release_retries = Integer(
        6,
        help="""Extra attempts to release an allocation while the NSML server does not answer
        (jittered exponential backoff from 0.25 s, doubling up to 8 s: about 16 s for 6). After
        the last, the allocation stays held and the hub log says how to release it.""",
    ).tag(config=True)

    @validate("release_retries")
    def _validate_release_retries(self, proposal: Any) -> int:
        value = int(proposal["value"])
        if value < 0:
            raise TraitError(f"release_retries={value!r} must be 0 or more, e.g. 6")
        return value

    dataset_timeout = Float(
        600.0,
        help="""Seconds a start waits for the node to cache the datasets asked for (a first use
        of a large dataset on a node copies it there) before failing with HTTP 503. Default
        600; Spawner.start_timeout still bounds the whole start.""",
    ).tag(config=True)

    @validate("dataset_timeout")
    def _validate_dataset_timeout(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not value > 0:
            raise TraitError(f"dataset_timeout={value!r} must be more than 0 seconds, e.g. 600")
        return value

    # ---- per-spawner state -------------------------------------------------------------------

    allocation: Allocation | None = None
    engine_url: str | None = None
    last_exit: LastExit | None = None
    options: NotebookOptions | None = None
    # The node whose Docker engine holds the user's home volume (kept across stops).
    home_node: str | None = None

    # Shared across spawners of the hub: one thread pool, one client per engine, one API client.
    _pool: ClassVar[ThreadPoolExecutor | None] = None
    _engines: ClassVar[dict[str, docker.APIClient]] = {}
    _nvidia: ClassVar[dict[str, bool]] = {}
    _engines_lock: ClassVar[threading.Lock] = threading.Lock()
    _api: ClassVar[NSMLClient | None] = None
    _deployment: ClassVar[dict[str, str]] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The configured image: start() sets self.image to the one a user chose.
        self._configured_image: str = self.image
        self._events: list[dict[str, Any]] = []
        self._events_changed = asyncio.Event()
        self._start_done = False
        self._release_task: asyncio.Task[Any] | None = None
        self._home: Home | None = None
        self._placement_reason = ""

    # ---- the NSML API and the Docker engines -------------------------------------------------

    @property
    def api(self) -> NSMLClient:
        """The client of the NSML API (shared by the hub's spawners)."""
        cls = NSMLSpawner
        if cls._api is None or cls._api.base_url != self.scheduler_url.rstrip("/") + "/":
            try:
                cls._api = NSMLClient(self.scheduler_url, self.scheduler_token, logger=self.log)
            except ValueError as e:
                raise SpawnException(
                    "The hub cannot reach the NSML scheduler (not configured); tell an admin.",
                    reason="misconfigured",
                    status_code=500,
                    log_message=str(e),
                ) from e
        return cls._api

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Threads for blocking docker-py calls (DockerSpawner's is one thread for the hub)."""
        cls = NSMLSpawner
        if cls._pool is None:
            cls._pool = ThreadPoolExecutor(
                max_workers=self.docker_threads, thread_name_prefix="nsml-spawner-docker"
            )
        return cls._pool

    @property
    def client(self) -> docker.APIClient:
        """The docker-py client of this server's engine (blocking: used in executor threads)."""
        return self._client_for(self.engine_url)

    def _client_for(self, url: str | None) -> docker.APIClient:
        """The shared docker-py client of the engine at *url* (None: the hub's own)."""
        key = url or ""
        cls = NSMLSpawner
        with cls._engines_lock:
            client = cls._engines.get(key)
            if client is None:
                client = cls._engines[key] = docker.APIClient(**self._engine_kwargs(url))
            return client

    def _engine_kwargs(self, url: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"version": "auto"}
        if url is None:
            # The hub's own engine, as DockerSpawner reaches it; but DOCKER_CERT_PATH names
            # the client certificate for the nodes' TCP engines, and docker-py would also
            # demand TLS (and a TCP address) for a local socket: none there.
            if self.tls_config:
                kwargs["tls"] = docker.tls.TLSConfig(**self.tls_config)
            env = docker.utils.kwargs_from_env()
            host = os.environ.get("DOCKER_HOST") or ""
            if not host.startswith(("tcp://", "https://", "ssh://")):
                env.pop("tls", None)
                env["base_url"] = host or "unix:///var/run/docker.sock"
            kwargs.update(env)
        else:
            kwargs["base_url"] = url
            if url.startswith(("tcp://", "https://")):
                cert_path = os.environ.get("DOCKER_CERT_PATH")
                if self.tls_config:
                    kwargs["tls"] = PinnedTLSConfig(**self.tls_config)
                elif cert_path:
                    kwargs["tls"] = PinnedTLSConfig(**tls_files(cert_path))
        kwargs.update(self.client_kwargs)
        return kwargs

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.executor.submit(fn))

    async def _nvidia_runtime(self) -> bool:
        """Whether this server's engine has the ``nvidia`` runtime (asked once per engine)."""
        key = self.engine_url or ""
        if key not in NSMLSpawner._nvidia:
            info = await self.docker("info")
            runtimes = info.get("Runtimes") or {}
            NSMLSpawner._nvidia[key] = "nvidia" in runtimes
            self.log.info(
                "Docker engine %s at %s: runtimes %s%s",
                info.get("ServerVersion"),
                self.engine_url or "the hub's host",
                ", ".join(sorted(runtimes)) or "none",
                "" if "nvidia" in runtimes else " (no nvidia: GPUs are passed as env only)",
            )
        return NSMLSpawner._nvidia[key]

    # ---- options -----------------------------------------------------------------------------

    def choices(self, cluster: ClusterLimits | None) -> Choices:
        """What users may ask for on this hub (*cluster*: the largest nodes, if known)."""
        allowed = self._get_allowed_images()  # "*" or a dict (DockerSpawner casts lists)
        listed: dict[str, str] = {} if allowed == "*" else dict(allowed or {})
        any_image = allowed == "*" or "*" in listed
        # A list entry (name == image) is allowed as a name or pattern (jupyter-nsml/*); names
        # without wildcards, and aliases (name -> image), are offered in the form.
        patterns = tuple(k for k, v in listed.items() if k == v and k != "*")
        offered = {k: v for k, v in listed.items() if "*" not in k and "?" not in k}
        return Choices(
            images={} if any_image else offered,
            default_image=self._configured_image,
            any_image=any_image,
            image_patterns=patterns,
            allow_gpu_sharing=self.allow_gpu_sharing,
            gpu_shares=tuple(self.gpu_shares),
            max_gpus=self.max_gpus,
            default_cpu=self.default_cpu,
            max_cpu=self.max_cpu,
            default_memory_mib=parse_memory_mib(self.default_memory, "default_memory"),
            max_memory_mib=(
                parse_memory_mib(self.max_memory, "max_memory") if self.max_memory else None
            ),
            cluster=cluster,
        )

    async def _cluster(self) -> tuple[ClusterLimits, dict[str, dict[str, Any]]]:
        nodes = await self.api.nodes()
        return cluster_limits(nodes), {str(n["name"]): n for n in nodes}

    async def render_options_form(self) -> str:
        """The spawn form, with the cluster's GPU models and why the last server stopped."""
        try:
            limits: ClusterLimits | None = (await self._cluster())[0]
        except NSMLError as e:
            self.log.warning("%s: spawn form without cluster facts: %s", self._log_name, e)
            limits = None
        notice = None
        if self.last_exit is not None and self.last_exit.reason != "exited":
            notice = "Your last server stopped. " + self.last_exit.message
        return render_form(self.choices(limits), self.user_options or {}, notice)

    def options_from_query(self, query_data: dict[str, list[str]]) -> dict[str, Any]:
        """``/hub/spawn?opt-gpus=1&opt-memory=4G``: the same fields as the form."""
        return _options_from_form(query_data, self)

    # ---- progress ----------------------------------------------------------------------------

    def _emit(self, progress: int, message: str) -> None:
        """Record a progress event for :meth:`progress` and log it."""
        self._events.append({"progress": progress, "message": message})
        self.log.info("%s: %s", self._log_name, message)
        changed, self._events_changed = self._events_changed, asyncio.Event()
        changed.set()

    async def progress(self) -> Any:
        """Progress events of the current start: the queue position while waiting, then the
        node and GPUs, then the container (like kubespawner's event stream)."""
        seen = 0
        while True:
            changed = self._events_changed
            while seen < len(self._events):
                yield self._events[seen]
                seen += 1
            if self._start_done:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)

    # ---- start -------------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Validate, wait for a placement, start the container on the chosen node, and wait
        until the server answers. Raises SpawnException: 400 for bad options or a request that
        can never fit, 503 when nothing fits within ``queue_timeout``."""
        self._events = []
        self._start_done = False
        try:
            return await self._start()
        finally:
            self._start_done = True
            changed, self._events_changed = self._events_changed, asyncio.Event()
            changed.set()

    async def _start(self) -> tuple[str, int]:
        try:
            limits, nodes = await self._cluster()
        except NSMLError as e:
            raise self._unavailable(e) from e
        try:
            opts = validate_options(self.user_options or {}, self.choices(limits))
        except OptionsError as e:
            raise SpawnException(str(e), reason="invalid_options", status_code=400) from None
        self.options = opts
        self.image = opts.image
        self._home = self._home_of_user()
        alloc = await self._place(opts)
        try:
            node = nodes.get(alloc.node) or await self.api.node(alloc.node)
            self.engine_url = engine_url_for(
                alloc.node,
                node.get("docker_url"),
                local_node=self.local_node,
                overrides=self.node_docker_urls,
            )
            await self._prepare_home(alloc)
            await self._prepare_datasets(alloc)
            # Host networking: a fresh port per start (the container is always new).
            self.port = random_port()
            self._emit(70, f"Creating the container on {alloc.node} ({alloc.gpu_words()})")
            ip_port: tuple[str, int] = await super().start()
            self._emit(90, f"Server started on {alloc.node}; waiting for it to answer")
            await self._wait_answering(*ip_port)
        except asyncio.CancelledError:
            self._hand_off_release()
            raise
        except Exception as e:
            await self._remove_quietly()
            await self._release_now()
            raise self._start_error(e, alloc) from e
        self.last_exit = None
        return ip_port

    # ---- the home -----------------------------------------------------------------------------

    def _home_of_user(self) -> Home | None:
        """The user's home from :attr:`home_volume` (None: no home, or the operator's own
        ``DockerSpawner.volumes`` mount the home path)."""
        if not self.home_volume.strip():
            return None
        for bind in self.volume_binds.values():
            if str(bind.get("bind", "")).rstrip("/") == self.home_mount_path.rstrip("/"):
                self.log.info(
                    "%s: DockerSpawner.volumes mounts %s; NSMLSpawner.home_volume is not used",
                    self._log_name,
                    self.home_mount_path,
                )
                return None
        source = self.format_volume_name(self.home_volume, self)
        try:
            return home_for(source, self.home_mount_path, self.home_uid, self.home_gid)
        except ValueError as e:
            raise SpawnException(
                "The hub's home folder setting is invalid; tell an admin.",
                reason="misconfigured",
                status_code=500,
                log_message=f"c.NSMLSpawner.home_volume={self.home_volume!r}: {e}",
            ) from None

    def _home_preference(self) -> str | None:
        """The node to prefer for this user's server: the one that holds the home volume."""
        if self._home is not None and self._home.node_local:
            return self.home_node
        return None

    async def _prepare_home(self, alloc: Allocation) -> None:
        """Make the user's home ready on the chosen node; say where it is and, when the
        server runs away from its home node, why and what that means."""
        home = self._home
        if home is None:
            return
        labels = home_labels(self.prefix, self.user.name)
        created = True
        if home.kind == "volume":

            def ensure() -> bool:
                api = self.client
                try:
                    api.inspect_volume(home.source)
                    return False
                except NotFound:
                    api.create_volume(name=home.source, driver="local", labels=labels)
                    return True

            created = await self._in_thread(ensure)
        if created:  # a new volume, or a shared folder: it may be new, check it every time
            await self._init_home(home, alloc, labels)
        message, self.home_node = home_news(
            home, self.home_node, alloc.node, created, self._placement_reason
        )
        self._emit(55, message)

    async def _init_home(self, home: Home, alloc: Allocation, labels: dict[str, str]) -> None:
        """Run the short root container that gives a new home the image's files and the
        notebook user as owner, and checks that the notebook user can write it."""
        name = f"{self.container_name}-home"
        create, host = home_init_container(home, self.image, name, {**labels, "nsml.kind": "init"})

        def run() -> tuple[int, str]:
            api = self.client
            with contextlib.suppress(NotFound):
                api.remove_container(name, force=True)  # left over from an interrupted start
            cid = api.create_container(host_config=api.create_host_config(**host), **create)["Id"]
            try:
                api.start(cid)
                code = int(api.wait(cid, timeout=120).get("StatusCode", 1))
                out = api.logs(cid).decode("utf-8", "replace").strip()
            finally:
                with contextlib.suppress(NotFound, APIError):
                    api.remove_container(cid, force=True)
            return code, out

        try:
            code, out = await self._in_thread(run)
        except APIError as e:
            if "executable file not found" not in str(e):
                raise
            if home.kind == "volume":
                # Docker itself copies the image's home (files and owner) into a new volume.
                self.log.warning(
                    "%s: image %s has no python3 to prepare the home %s; relying on Docker's "
                    "copy of the image's home into the new volume",
                    self._log_name,
                    self.image,
                    home.source,
                )
                return
            raise SpawnException(
                f"Your home folder ({home.describe()}) on {alloc.node} cannot be prepared: the "
                f"image {self.image} has no python3. Choose another image, or tell an admin.",
                reason="home_unusable",
                status_code=500,
            ) from None
        if code != 0:
            last = out.splitlines()[-1] if out else f"exit code {code}"
            raise SpawnException(
                f"Your home folder ({home.describe()}) on {alloc.node} cannot be used: {last}. "
                "Tell an admin.",
                reason="home_unusable",
                status_code=500,
                log_message=f"{self._log_name}: home {home.source} on {alloc.node}: {out!r}",
            )

    async def delete_forever(self) -> None:
        """The user (or this named server) is deleted: remove its home volumes from every
        node if :attr:`remove_home_on_delete` is on; otherwise say where they are kept."""
        inherited = super().delete_forever()  # JupyterHub's is a no-op, DockerSpawner has none
        if inherited is not None:
            await inherited
        home = self._home_of_user()
        if home is None:
            return
        shared = "{servername}" in self.home_volume or "{raw_servername}" in self.home_volume
        if self.name and not shared:
            return  # the user's home outlives a named server
        if not self.remove_home_on_delete or not home.node_local:
            self.log.info(
                "%s deleted; their home %s is kept (an operator removes it%s)",
                self._log_name,
                home.describe(),
                " with docker volume rm on its node" if home.node_local else "",
            )
            return
        for node in await self.api.nodes():
            name = str(node.get("name"))
            try:
                url = engine_url_for(
                    name,
                    node.get("docker_url"),
                    local_node=self.local_node,
                    overrides=self.node_docker_urls,
                )
            except NodeUnreachable:
                continue

            def remove(url: str | None = url) -> bool:
                try:
                    self._client_for(url).remove_volume(home.source)
                    return True
                except NotFound:
                    return False

            try:
                if await self._in_thread(remove):
                    self.log.info(
                        "%s: removed home volume %s on %s", self._log_name, home.source, name
                    )
            except (APIError, requests.exceptions.RequestException) as e:
                self.log.error(
                    "%s: could not remove home volume %s on %s (%s); remove it there with "
                    "docker volume rm %s",
                    self._log_name,
                    home.source,
                    name,
                    e,
                    home.source,
                )

    async def _prepare_datasets(self, alloc: Allocation) -> None:
        """Have the node cache the datasets asked for and hold them for this server; keep
        their read-only mounts for the container (none when no dataset was asked for)."""
        self._mounts: list[Any] = []
        self._dataset_refs: list[str] = []
        if self.options is None or not self.options.datasets:
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            left = self.dataset_timeout - (loop.time() - t0)
            status, out = await self.api.mounts(alloc.placement_id, wait_s=max(0.0, min(10, left)))
            mounts = out.get("mounts") or []
            if status == 200:
                try:
                    self._mounts = dataset_mounts(mounts)
                except MountsNotReady as e:
                    raise SpawnException(
                        f"The datasets could not be mounted: {e}; tell an admin.",
                        reason="dataset_mount",
                        status_code=500,
                    ) from None
                self._dataset_refs = [str(m["ref"]) for m in mounts]
                self._emit(65, f"Datasets ready on {alloc.node}: {', '.join(self._dataset_refs)}")
                return
            ready = sum(1 for m in mounts if m.get("state") == "ready")
            self._emit(
                60,
                f"Caching datasets on {alloc.node} ({ready} of {len(mounts)} ready): "
                f"{out.get('message')}",
            )
            if loop.time() - t0 >= self.dataset_timeout:
                raise SpawnException(
                    f"The datasets were not cached on {alloc.node} within "
                    f"{self.dataset_timeout:.0f}s ({out.get('message')}); try again later.",
                    reason="dataset_timeout",
                    status_code=503,
                )

    async def _wait_answering(self, host: str, port: int) -> None:
        """Wait until the server answers HTTP (any status below 500), as the hub's check does.

        Polling every 0.05-0.5 s from here means the hub's own check (a jittered back-off of
        up to 5 s between tries) finds the server up at its first try; a container that ends
        meanwhile fails the start at once, saying why (e.g. out of memory). After
        ``http_timeout`` seconds this returns and leaves the verdict to the hub.
        """
        base = self.server.base_url if self.server is not None else "/"
        url = f"http://{host}:{port}{base}api"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        next_inspect = t0 + 1.0
        while (elapsed := loop.time() - t0) < self.http_timeout:
            try:
                resp = await self.api.http.fetch(
                    HTTPRequest(url, request_timeout=2, connect_timeout=1, follow_redirects=False),
                    raise_error=False,
                )
                if 0 < resp.code < 500 and resp.code != 599:
                    self._emit(95, f"Server answers ({elapsed:.1f}s after its container started)")
                    return
            except (HTTPClientError, OSError):
                pass  # not listening yet
            if loop.time() >= next_inspect:
                next_inspect = loop.time() + 1.0
                container = await self.get_object()
                state = (container or {}).get("State") or {}
                if not state.get("Running"):
                    memory = self.allocation.memory_mib if self.allocation else 0
                    ended = describe_exit(state, memory) if container else None
                    raise self._ended_while_starting(ended)
            await asyncio.sleep(min(0.5, 0.05 + 0.05 * elapsed))
        self.log.warning(
            "%s: server at %s did not answer in %ss; leaving it to the hub",
            self._log_name,
            url,
            self.http_timeout,
        )

    def _ended_while_starting(self, ended: LastExit | None) -> Exception:
        """The start failed because the container ended before its server answered."""
        if ended is None:
            err: Exception = SpawnException(
                "Your server's container disappeared while it was starting; try again.",
                reason="container_gone",
                status_code=500,
            )
            return err
        self.last_exit = ended
        self.log.warning("%s: container ended while starting: %s", self._log_name, ended.message)
        err = SpawnException(
            ended.message,
            reason=ended.reason,
            status_code=400 if ended.reason == "oom_killed" else 500,
        )
        return err

    async def _place(self, opts: NotebookOptions) -> Allocation:
        """Ask the scheduler and wait in its queue; raise SpawnException when it cannot be."""
        body = opts.placement_body(holder_for(self.name), self.user.name, self._home_preference())
        timeout = min(self.queue_timeout, max(1.0, float(self.start_timeout) - 10))
        self._emit(10, f"Asking the NSML scheduler for {opts.describe()}")
        last: dict[str, Any] = {}

        def on_wait(out: dict[str, Any], waited: float) -> None:
            if (out.get("position"), out.get("reason")) != (
                last.get("position"),
                last.get("reason"),
            ):
                self.placement_id = int(out["id"])
                self._emit(
                    20,
                    f"Waiting in the NSML queue at position {out.get('position')} "
                    f"({waited:.0f}s of at most {timeout:.0f}s): {out.get('reason')}",
                )
            last.update(out)

        try:
            out = await wait_for_placement(
                self.api, body, timeout_s=timeout, poll_s=QUEUE_POLL_S, on_wait=on_wait
            )
        except asyncio.CancelledError:
            if self.placement_id:
                self._hand_off_release()
            else:
                # Cancelled during the first ask: the request may exist without our knowing
                # its id. Asking again for the same holder names it; then cancel it.
                self._hand_off(self._cancel_holder(body), f"the request of {body['holder']}")
            raise
        except Infeasible as e:
            raise SpawnException(
                f"{e.message} Ask for fewer GPUs, another GPU model, less CPU or memory.",
                reason="infeasible",
                status_code=400,
            ) from None
        except QueueTimeout as e:
            await self._release_now()
            raise self._capacity_error(opts, e) from None
        except NSMLError as e:
            await self._release_now()
            raise self._unavailable(e) from e
        finally:
            self.placement_id = 0
        alloc = Allocation.from_placement(out)
        self.allocation = alloc
        self._placement_reason = str(out.get("reason") or "")
        self._emit(50, f"Placed on {alloc.node}: {alloc.gpu_words()}")
        return alloc

    @property
    def placement_id(self) -> int:
        """The placement request this spawner holds or waits for (0: none)."""
        if self.allocation is not None:
            return self.allocation.placement_id
        return self._waiting_id

    @placement_id.setter
    def placement_id(self, value: int) -> None:
        self._waiting_id = value

    _waiting_id: int = 0

    def _capacity_error(self, opts: NotebookOptions, e: QueueTimeout) -> SpawnException:
        try_next = ["fewer GPUs"]
        if opts.gpus > 0 and opts.gpu_model:
            try_next.append("another GPU model (or any model)")
        elif opts.gpus > 0:
            try_next.append("a fraction of a GPU" if self.allow_gpu_sharing else "a GPU model")
        try_next.append("less CPU or memory")
        return SpawnException(
            f"No room for your server after {e.waited_s:.0f}s in the NSML queue (position "
            f"{e.last.get('position')}): {e.last.get('reason')}. Try {', '.join(try_next)}, "
            "or try again later.",
            reason="capacity",
            status_code=503,
        )

    def _unavailable(self, e: NSMLError) -> SpawnException:
        if isinstance(e, NSMLUnavailable):
            return SpawnException(
                "The NSML scheduler does not answer right now; try again in a minute.",
                reason="nsml_unavailable",
                status_code=503,
                log_message=str(e),
            )
        if e.status == 404 and e.reason == "not_found":
            # The placement names a dataset the user cannot read (or a version that is gone).
            return SpawnException(e.message, reason="dataset_not_found", status_code=400)
        if e.reason in ("dataset_cache", "dataset_cache_full", "dataset_cache_too_small"):
            return SpawnException(
                f"The datasets cannot be cached for your server: {e.message}",
                reason=e.reason,
                status_code=503,
            )
        if e.status in (401, 403):
            return SpawnException(
                "The hub may not ask the NSML scheduler for servers (a configuration problem); "
                "tell an admin.",
                reason="misconfigured",
                status_code=500,
                log_message=f"the NSML API refused the spawner's token: {e}; check "
                "c.NSMLSpawner.scheduler_token and NSMLServer.trusted_services",
            )
        return SpawnException(
            f"The NSML scheduler refused the server: {e.message}",
            reason=e.reason,
            status_code=400 if e.status == 400 else 503,
        )

    def _start_error(self, e: Exception, alloc: Allocation) -> Exception:
        """Map a container start failure to a message for the user."""
        if isinstance(e, NSMLError):
            err: Exception = self._unavailable(e)
            return err
        if isinstance(e, NodeUnreachable):
            err = SpawnException(
                f"The scheduler placed the server on {alloc.node}, but {e}",
                reason="node_unreachable",
                status_code=503,
            )
            return err
        if isinstance(e, ImageNotFound):
            err = SpawnException(
                f"The notebook image {self.image!r} is not on the Docker engine of node "
                f"{alloc.node}. An admin can build it with hub_config/images/build.sh.",
                reason="image_not_found",
                status_code=503,
            )
            return err
        if isinstance(e, APIError) and "could not select device driver" in str(e):
            NSMLSpawner._nvidia.pop(self.engine_url or "", None)
            err = SpawnException(
                f"The Docker engine of node {alloc.node} cannot give containers GPUs (no "
                "NVIDIA runtime). Ask for 0 GPUs, or ask an admin to install the NVIDIA "
                "container toolkit there.",
                reason="gpu_runtime_missing",
                status_code=503,
            )
            return err
        if isinstance(e, requests.exceptions.ConnectionError):
            err = SpawnException(
                f"The Docker engine of node {alloc.node} does not answer; try again later.",
                reason="engine_unavailable",
                status_code=503,
                log_message=f"{alloc.node} ({self.engine_url or 'local engine'}): {e}",
            )
            return err
        return e

    # ---- the container -----------------------------------------------------------------------

    async def create_object(self) -> dict[str, Any]:
        """Create the container from the pure spec (:func:`notebook_container`)."""
        assert self.options is not None and self.allocation is not None
        engine = Engine(
            node=self.allocation.node,
            url=self.engine_url,
            nvidia_runtime=await self._nvidia_runtime(),
        )
        settings = ContainerSettings(
            name=self.container_name,
            command=await self.get_command(),
            base_env=self.get_env(),
            nsml_api_url=self.nsml_api_url,
            api_token=self.api_token or "",
            labels={
                "org.jupyter.service": "jupyterhub",
                "nsml.kind": "notebook",
                "nsml.user": self.user.name,
                "nsml.server": self.name,
                "nsml.node": self.allocation.node,
                "nsml.placement": str(self.allocation.placement_id),
                # The NSML server's orphan sweep removes it from a node that was lost once
                # this allocation is released (only containers with its deployment label).
                "org.jupyter-nsml.allocation": str(self.allocation.allocation_id),
                **await self._deployment_labels(),
            },
            visible_devices="uuid" if self.visible_devices == "uuid" else "index",
            binds=self.volume_binds,
        )
        args = notebook_container(
            self.options,
            self.allocation,
            engine,
            settings,
            mounts=getattr(self, "_mounts", []),
            dataset_refs=getattr(self, "_dataset_refs", []),
            home=self._home,
        )
        create, host = dict(args.create), dict(args.host_config)
        for extra, into in (
            (self.extra_create_kwargs, create),
            (self.extra_host_config, host),
        ):
            value = self._eval_if_callable(extra)
            if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                value = await value
            _deep_merge(into, self._render_templates(value))

        def create_container() -> dict[str, Any]:
            api = self.client
            created: dict[str, Any] = api.create_container(
                host_config=api.create_host_config(**host), **create
            )
            return created

        return await self._in_thread(create_container)

    async def stop_object(self) -> None:
        """``docker stop``, unless there is no container (stop after a failed start). An
        engine that does not answer is left alone: the NSML server's orphan sweep removes the
        container when its node answers again."""
        if self.object_id:
            try:
                await super().stop_object()
            except APIError:
                raise
            except ENGINE_SILENT as e:
                self.log.warning("%s: cannot stop the container: %s", self._log_name, e)

    async def remove_object(self) -> None:
        """``docker rm -v``, unless there is no container (or its engine does not answer)."""
        if self.object_id:
            try:
                await super().remove_object()
            except APIError:
                raise
            except ENGINE_SILENT as e:
                self.log.warning("%s: cannot remove the container: %s", self._log_name, e)

    async def _remove_quietly(self) -> None:
        cid = str(getattr(self, "object_id", "") or "")
        try:
            await self.remove_object()
        except Exception as e:
            self.log.warning("%s: could not remove container %s: %s", self._log_name, cid[:12], e)
        self.object_id = ""

    async def get_ip_and_port(self) -> tuple[str, int]:
        """Host networking: the node's address and the port picked at start."""
        return server_host(self.engine_url), int(self.port)

    # ---- poll / stop ------------------------------------------------------------------------

    async def poll(self) -> int | None:
        """None while the container runs; else its exit status, after recording why it ended
        (``last_exit``), releasing the allocation and removing the container."""
        try:
            container = await self.get_object()
        except APIError:
            raise
        except ENGINE_SILENT as e:
            lost = await self._node_lost()
            node = self.allocation.node if self.allocation else "?"
            if lost is None:
                self.log.warning(
                    "%s: the Docker engine of node %s does not answer (%s); its node is not "
                    "down: assuming the server still runs",
                    self._log_name,
                    node,
                    e,
                )
                return None
            self.log.warning(
                "%s: node %s is lost (%s) and its engine does not answer; reporting the "
                "server stopped and releasing its allocation",
                self._log_name,
                node,
                lost,
            )
            self.last_exit = node_lost_exit(node, lost)
            await self._release_now()
            self.object_id = ""  # the orphan sweep removes the container when the node returns
            return self.last_exit.exit_code
        if container is None:
            if self.allocation is not None:
                self.log.warning(
                    "%s: container %s is gone; releasing its allocation",
                    self._log_name,
                    self.object_name,
                )
            await self._release_now()
            # Gone: removed by an earlier poll that recorded why it ended, or by someone else.
            return self.last_exit.exit_code if self.last_exit is not None else 0
        state = container.get("State") or {}
        if state.get("Running"):
            return None
        memory = self.allocation.memory_mib if self.allocation else 0
        ended = describe_exit(state, memory)
        self.last_exit = ended
        if ended.reason == "oom_killed":
            self.log.warning(
                "%s: container %s on %s was killed by the engine at its %s memory limit "
                "(OOMKilled, exit code %d)",
                self._log_name,
                self.object_name,
                self.allocation.node if self.allocation else "?",
                format_mib(memory),
                ended.exit_code,
            )
        else:
            self.log.warning(
                "%s: container %s ended: %s", self._log_name, self.object_name, ended.message
            )
        await self._release_now()
        if self.remove:
            await self._remove_quietly()
        return ended.exit_code

    async def _deployment_labels(self) -> dict[str, str]:
        """``{"org.jupyter-nsml.server": LABEL}``: the NSML deployment's container label
        (``GET api/health``, asked once), so that its orphan sweep may remove this container
        from a lost node that returns; empty when the server does not say."""
        key = self.scheduler_url
        if key not in NSMLSpawner._deployment:
            try:
                _, out = await self.api.call("GET", "health")
                NSMLSpawner._deployment[key] = str((out or {}).get("deployment") or "")
            except NSMLError as e:
                self.log.warning("%s: no deployment label (%s)", self._log_name, e)
                return {}
        label = NSMLSpawner._deployment[key]
        return {"org.jupyter-nsml.server": label} if label else {}

    async def _node_lost(self) -> str | None:
        """Why this server's node counts as lost, from the NSML server, or None: its
        allocation was released by the server (the node stayed silent past its grace), or the
        node is ``down`` (no heartbeat for the server's node_timeout). None as well when the
        NSML server cannot tell (then the engine's silence alone proves nothing)."""
        if self.allocation is None:
            return None
        try:
            out = await self.api.placement(self.allocation.placement_id)
            alloc = out.get("allocation") or {}
            if out.get("state") == "released" or alloc.get("state") == "released":
                return "the NSML server released its resources"
            node = await self.api.node(self.allocation.node)
        except NSMLError as e:
            self.log.warning("%s: cannot ask the NSML server about its node: %s", self._log_name, e)
            return None
        if node.get("state") == "down":
            age = node.get("heartbeat_age_s")
            return "no heartbeat" + (f" for {age:.0f}s" if isinstance(age, int | float) else "")
        return None

    async def stop(self, now: bool = False) -> None:
        """Stop and remove the container, then release the allocation (idempotent)."""
        self._release_task = None
        await super().stop(now=now)  # ends with clear_state(), which hands off the release
        task = self._release_task
        if task is not None:
            await asyncio.shield(task)

    def _hand_off_release(self) -> asyncio.Task[Any] | None:
        """Start releasing what this spawner holds, in the background; forget it here."""
        pid = self.placement_id
        self.allocation = None
        self._waiting_id = 0
        if not pid:
            return None
        return self._hand_off(self._release(pid), f"placement {pid}")

    def _hand_off(self, work: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any] | None:
        """Run *work* (releasing *what*) in the background, kept alive until done."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            work.close()
            self.log.error(
                "%s: cannot release %s now (no event loop); an admin can release it with "
                "DELETE /services/nsml/api/placements/ID",
                self._log_name,
                what,
            )
            return None
        task = loop.create_task(work)
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
        self._release_task = task
        return task

    async def _cancel_holder(self, body: dict[str, Any]) -> None:
        """Cancel the request of this server's holder whose id was never learned."""
        try:
            _, out = await self.api.place(body, wait_s=0)
        except NSMLError as e:
            self.log.error(
                "%s: could not find the placement of %s to cancel it (%s)",
                self._log_name,
                body.get("holder"),
                e,
            )
            return
        if out.get("state") in ("waiting", "placed"):
            await self._release(int(out["id"]))

    async def _release_now(self) -> None:
        task = self._hand_off_release()
        if task is not None:
            await asyncio.shield(task)

    async def _release(self, pid: int) -> bool:
        """``DELETE placements/ID`` with retries; True when released (or already gone)."""
        try:
            out = await self.api.release(pid, retries=self.release_retries)
        except NSMLError as e:
            self.log.error(
                "%s: could not release placement %d (%s); its resources stay allocated until "
                "an admin releases it: DELETE /services/nsml/api/placements/%d",
                self._log_name,
                pid,
                e,
                pid,
            )
            return False
        self.log.info(
            "%s: released placement %d (%s)",
            self._log_name,
            pid,
            out.get("state") if out else "unknown to the NSML server",
        )
        return True

    # ---- state -------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.port:
            state["port"] = self.port
        if self.allocation is not None:
            state["allocation"] = self.allocation.to_state()
            state["engine_url"] = self.engine_url
        if self.last_exit is not None:
            state["last_exit"] = self.last_exit.to_state()
        if self.home_node is not None:
            state["home_node"] = self.home_node
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if state.get("port"):
            self.port = int(state["port"])
        if state.get("allocation"):
            self.allocation = Allocation.from_state(state["allocation"])
            self.engine_url = state.get("engine_url")
        if state.get("last_exit"):
            self.last_exit = LastExit.from_state(state["last_exit"])
        if state.get("home_node"):
            self.home_node = str(state["home_node"])

    def clear_state(self) -> None:
        """Forget the server; an allocation still held is released in the background. Why
        the last server ended (``last_exit``) is kept for the next spawn form, and the node
        that holds the user's home (``home_node``) for the next placement."""
        super().clear_state()
        self._hand_off_release()
        self.port = 0
        self.engine_url = None
        self.options = None
