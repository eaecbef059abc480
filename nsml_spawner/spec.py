"""Pure builders of notebook containers: (options, allocation, engine, settings) -> docker-py args.

Like kubespawner's ``make_pod``: no hub, no Docker engine, no clock. The spawner gathers the
values and does the I/O. The container arguments come from the same builder the NSML server
uses for training sessions (:func:`nsml_server.backends.docker.container_args`), so notebooks and
sessions get GPUs, limits and host networking the same way.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from escapism import escape

from nsml_server.backends.base import Mount, RunSpec
from nsml_server.backends.docker import (
    ContainerArgs,
    PinnedTLSConfig,
    container_args,
    tls_files,
)

from .options import NotebookOptions, format_mib

__all__ = [
    "Allocation",
    "ContainerSettings",
    "Engine",
    "Home",
    "LastExit",
    "MountsNotReady",
    "NodeUnreachable",
    "PinnedTLSConfig",
    "dataset_mounts",
    "describe_exit",
    "engine_url_for",
    "holder_for",
    "home_for",
    "home_init_container",
    "home_labels",
    "home_news",
    "notebook_container",
    "server_host",
    "tls_files",
]

MIB = 1024 * 1024
_HOLDER_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-"


class NodeUnreachable(ValueError):
    """The hub has no way to reach the Docker engine of a node."""


@dataclass(frozen=True)
class Allocation:
    """The resources the scheduler gave one notebook server.

    Attributes:
        placement_id: the placement request (``api/placements/ID``).
        allocation_id: the allocation row that holds the resources.
        node: the node's name.
        gpu_indices: the node's GPU indices (a shared GPU appears once).
        gpu_uuids: the same GPUs' UUIDs.
        gpu_milli_per_gpu: the share of each GPU, 1000 for a whole GPU.
        cpu_milli: CPU in milli-cores.
        memory_mib: memory in MiB.
    """

    placement_id: int
    allocation_id: int
    node: str
    gpu_indices: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    gpu_milli_per_gpu: int = 0
    cpu_milli: int = 0
    memory_mib: int = 0

    @classmethod
    def from_placement(cls, placement: Mapping[str, Any]) -> Allocation:
        """From a ``PlacementOut`` body whose state is ``placed``."""
        a = placement["allocation"]
        return cls(
            placement_id=int(placement["id"]),
            allocation_id=int(a["id"]),
            node=str(a["node"]),
            gpu_indices=tuple(int(i) for i in a.get("gpu_indices") or ()),
            gpu_uuids=tuple(str(u) for u in a.get("gpu_uuids") or ()),
            gpu_milli_per_gpu=int(a.get("gpu_milli_per_gpu") or 0),
            cpu_milli=int(a.get("cpu_milli") or 0),
            memory_mib=int(a.get("memory_mib") or 0),
        )

    def to_state(self) -> dict[str, Any]:
        """A JSON-able dict for the spawner's state (the inverse of :meth:`from_state`)."""
        return {
            "placement_id": self.placement_id,
            "allocation_id": self.allocation_id,
            "node": self.node,
            "gpu_indices": list(self.gpu_indices),
            "gpu_uuids": list(self.gpu_uuids),
            "gpu_milli_per_gpu": self.gpu_milli_per_gpu,
            "cpu_milli": self.cpu_milli,
            "memory_mib": self.memory_mib,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Allocation:
        return cls(
            placement_id=int(state["placement_id"]),
            allocation_id=int(state.get("allocation_id") or 0),
            node=str(state["node"]),
            gpu_indices=tuple(int(i) for i in state.get("gpu_indices") or ()),
            gpu_uuids=tuple(str(u) for u in state.get("gpu_uuids") or ()),
            gpu_milli_per_gpu=int(state.get("gpu_milli_per_gpu") or 0),
            cpu_milli=int(state.get("cpu_milli") or 0),
            memory_mib=int(state.get("memory_mib") or 0),
        )

    def gpu_words(self) -> str:
        """``GPUs 2,3`` / ``half of GPU 1`` / ``no GPU``, for messages."""
        if not self.gpu_indices:
            return "no GPU"
        ids = ",".join(str(i) for i in self.gpu_indices)
        if self.gpu_milli_per_gpu and self.gpu_milli_per_gpu < 1000:
            return f"{self.gpu_milli_per_gpu / 1000:g} of GPU {ids}"
        return f"GPU{'s' if len(self.gpu_indices) > 1 else ''} {ids}"


@dataclass(frozen=True)
class Engine:
    """The Docker engine that runs a node's containers, as the hub reaches it.

    Attributes:
        node: the node's name.
        url: the engine's URL; None: the hub's own engine (``DOCKER_HOST`` or the local socket).
        nvidia_runtime: the engine lists the ``nvidia`` runtime (only then are GPU device
            requests added; without it they fail at container start).
    """

    node: str
    url: str | None
    nvidia_runtime: bool = False


@dataclass(frozen=True)
class ContainerSettings:
    """What the hub and its configuration add to every notebook container.

    Attributes:
        name: the container name.
        command: the program and its arguments (the image's command plus the hub's args).
        base_env: the hub's environment for single-user servers (``Spawner.get_env()``),
            which carries the server's own API token as ``JUPYTERHUB_API_TOKEN``.
        nsml_api_url: the NSML API as seen from inside the container ('' for none).
        api_token: the server's hub token; the hub's ``server`` role scopes it to the ``nsml``
            service, so the ``nsml`` client inside uses it as ``NSML_TOKEN``.
        labels: container labels.
        visible_devices: name GPUs by ``index`` (``2,3``) or by ``uuid`` (``GPU-...``).
        binds: extra host paths (docker-py ``binds`` form), e.g. from
            ``DockerSpawner.volumes``.
        init: run Docker's init as PID 1.
    """

    name: str
    command: Sequence[str]
    base_env: Mapping[str, str] = field(default_factory=dict)
    nsml_api_url: str = ""
    api_token: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    visible_devices: Literal["index", "uuid"] = "index"
    binds: Mapping[str, Any] = field(default_factory=dict)
    init: bool = True


@dataclass(frozen=True)
class LastExit:
    """Why a notebook server's container ended, as the engine reported it.

    Attributes:
        reason: ``oom_killed`` (the engine killed it at its memory limit), ``exited``
            (the server ended by itself), ``error`` (the engine could not run it), or
            ``node_lost`` (its node went silent and its engine does not answer).
        exit_code: the container's exit status (137 for a kill).
        message: a sentence for the user, with what to do.
        finished_at: when it ended, as the engine wrote it (RFC 3339), if known.
    """

    reason: Literal["oom_killed", "exited", "error", "node_lost"]
    exit_code: int
    message: str
    finished_at: str | None = None

    def to_state(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "exit_code": self.exit_code,
            "message": self.message,
            "finished_at": self.finished_at,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LastExit:
        reason = state.get("reason")
        return cls(
            reason=reason if reason in ("oom_killed", "exited", "error", "node_lost") else "exited",
            exit_code=int(state.get("exit_code") or 0),
            message=str(state.get("message") or ""),
            finished_at=state.get("finished_at"),
        )


def node_lost_exit(node: str, why: str) -> LastExit:
    """The end of a notebook server whose node was lost (*why*: what the NSML server said)."""
    return LastExit(
        reason="node_lost",
        exit_code=1,
        message=(
            f"Your notebook server's node {node} was lost ({why}); the server was stopped. "
            "Start it again: it is placed on another node. Files in your home volume on "
            f"{node} come back with the node."
        ),
    )


def holder_for(server_name: str) -> str:
    """The placement holder of a user's server: ``notebook`` or ``notebook:NAME`` (escaped)."""
    if not server_name:
        return "notebook"
    return "notebook:" + str(escape(server_name, safe=_HOLDER_SAFE, escape_char="_"))[:180]


DATA_ROOT = "/data"
"""Containers see each dataset read-only at ``/data/NAME``."""


class MountsNotReady(ValueError):
    """The NSML server's answer does not (yet) give a usable mount for every dataset."""


def dataset_mounts(answer: Sequence[Mapping[str, Any]]) -> list[Mount]:
    """Read-only bind mounts from the NSML server's ``POST placements/ID/mounts`` answer.

    Each ready dataset's folder in the node's cache (``host_path``) is mounted read-only at
    its ``container_path`` (``/data/NAME``). The spawner asks the server (the I/O) and
    passes the answer's ``mounts`` here.

    Raises:
        MountsNotReady: a dataset is not ready, or the answer names a path that is not
            absolute, is outside ``/data``, or is mounted twice.
    """
    mounts: list[Mount] = []
    targets: set[str] = set()
    for m in answer:
        ref = str(m.get("ref", "?"))
        if m.get("state") != "ready" or not m.get("host_path"):
            raise MountsNotReady(f"{ref} is not ready on the node ({m.get('state')})")
        source, target = str(m["host_path"]), str(m.get("container_path") or "")
        parent, _, leaf = target.rpartition("/")
        if (
            not source.startswith("/")
            or parent != DATA_ROOT
            or not leaf
            or leaf in (".", "..")
            or target in targets
        ):
            raise MountsNotReady(f"{ref}: refusing to mount {source!r} at {target!r}")
        targets.add(target)
        mounts.append(Mount(source=source, target=target, read_only=True))
    return sorted(mounts, key=lambda m: m.target)


def notebook_container(
    options: NotebookOptions,
    allocation: Allocation,
    engine: Engine,
    settings: ContainerSettings,
    mounts: Sequence[Mount] = (),
    dataset_refs: Sequence[str] = (),
    home: Home | None = None,
) -> ContainerArgs:
    """The docker-py arguments of one notebook server's container.

    The container sees exactly the allocated GPUs (``NVIDIA_VISIBLE_DEVICES``, and device
    requests when the engine has the NVIDIA runtime), gets hard memory and CPU limits equal
    to the allocation (no swap beyond it), the requested datasets read-only (*mounts*, from
    :func:`dataset_mounts`), and what the ``nsml`` client needs. ``NSML_DATASETS`` names the
    versions mounted (*dataset_refs*, ``name@k``), else the references asked for. The user's
    *home* (a Docker volume or a shared folder) is mounted read-write at its target, unless
    the hub's own ``binds`` already mount something there (an operator's
    ``DockerSpawner.volumes`` wins).
    """
    if settings.visible_devices == "uuid" and all(allocation.gpu_uuids):
        gpu_ids = list(allocation.gpu_uuids)
    else:
        gpu_ids = [str(i) for i in allocation.gpu_indices]
    env = {str(k): str(v) for k, v in settings.base_env.items()}
    env.update(
        {
            "NSML_NODE": allocation.node,
            "NSML_PLACEMENT_ID": str(allocation.placement_id),
            "NSML_GPU_MILLI": str(allocation.gpu_milli_per_gpu if gpu_ids else 0),
            "NSML_DATASETS": ",".join(dataset_refs or options.datasets),
        }
    )
    if settings.nsml_api_url:
        env["NSML_API_URL"] = settings.nsml_api_url
    if settings.api_token:
        env["NSML_TOKEN"] = settings.api_token
    spec = RunSpec(
        name=settings.name,
        image=options.image,
        command=list(settings.command),
        env=env,
        mounts=list(mounts),
        gpu_ids=gpu_ids,
        cpu_limit=allocation.cpu_milli / 1000 if allocation.cpu_milli > 0 else None,
        mem_limit_bytes=allocation.memory_mib * MIB if allocation.memory_mib > 0 else None,
        labels=dict(settings.labels),
    )
    args = container_args(spec, nvidia_runtime=engine.nvidia_runtime, init=settings.init)
    binds = dict(settings.binds)
    if home is not None and not _mounts_at(binds, home.target):
        binds = {**home.bind(), **binds}
    if binds:
        args.host_config["binds"] = binds
    return args


def _mounts_at(binds: Mapping[str, Any], target: str) -> bool:
    """Whether docker-py *binds* mount something at *target*."""
    for value in binds.values():
        bind = value.get("bind") if isinstance(value, Mapping) else value
        if posixpath.normpath(str(bind)) == posixpath.normpath(target):
            return True
    return False


# ---- homes ---------------------------------------------------------------------------------

HOME_TARGET = "/home/jovyan"
"""Where the notebook images (docker-stacks, and the offline build) keep the user's home."""

_VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}\Z")
_HOME_FORM = (
    "a Docker volume name ('nsml-home-{username}': letters, digits, '_', '.', '-') or an "
    "absolute path on a filesystem every node mounts ('/mnt/nfs/homes/{username}')"
)


@dataclass(frozen=True)
class Home:
    """A user's persistent home folder, mounted read-write into every server of the user.

    Attributes:
        source: a Docker volume name (node-local: each node that runs the user's server has
            its own) or an absolute path on a filesystem that every node mounts at that path
            (a shared home, e.g. NFS).
        target: where the container sees it (the image's home).
        uid: the notebook user, who must be able to write it.
        gid: the notebook user's group.
    """

    source: str
    target: str = HOME_TARGET
    uid: int = 1000
    gid: int = 100

    @property
    def kind(self) -> Literal["volume", "path"]:
        """``volume`` (node-local) or ``path`` (a shared filesystem)."""
        return "path" if self.source.startswith("/") else "volume"

    @property
    def node_local(self) -> bool:
        """Whether the home lives on one node (a volume), so placement should follow it."""
        return self.kind == "volume"

    def bind(self) -> dict[str, dict[str, str]]:
        """The docker-py ``binds`` entry."""
        return {self.source: {"bind": self.target, "mode": "rw"}}

    def describe(self) -> str:
        """``volume nsml-home-alice`` / ``folder /mnt/nfs/homes/alice``, for messages."""
        return f"{'volume' if self.kind == 'volume' else 'folder'} {self.source}"


def home_for(source: str, target: str = HOME_TARGET, uid: int = 1000, gid: int = 100) -> Home:
    """Check a rendered home source (volume name or absolute path) and make the :class:`Home`.

    Raises:
        ValueError: the source is neither a Docker volume name nor a clean absolute path
            (``..`` and ``//`` are refused: a user name must never reach another folder).
    """
    if source.startswith("/"):
        parts = source.split("/")[1:]
        if source == "/" or any(p in ("", ".", "..") for p in parts) or "\x00" in source:
            raise ValueError(f"home {source!r} is not a clean absolute path; expected {_HOME_FORM}")
    elif not _VOLUME_NAME.match(source):
        raise ValueError(f"home {source!r} is not a Docker volume name; expected {_HOME_FORM}")
    if not target.startswith("/") or posixpath.normpath(target) != target or target == "/":
        raise ValueError(
            f"home target {target!r} must be a clean absolute path, e.g. {HOME_TARGET}"
        )
    return Home(source=source, target=target, uid=uid, gid=gid)


def home_labels(deployment: str, user: str) -> dict[str, str]:
    """Labels of a home volume: which deployment made it, for which user
    (``docker volume ls --filter label=nsml.user=alice``)."""
    return {
        "org.jupyter.service": "jupyterhub",
        "nsml.kind": "home",
        "nsml.deployment": deployment,
        "nsml.user": user,
    }


HOME_INIT_MOUNT = "/mnt/nsml-home"

# Run as root in the notebook image before a new home is first used: an empty home gets the
# image's own home folder (its skeleton files) and the notebook user as owner; a home that
# holds files is left as it is. Either way the notebook user must be able to write it.
HOME_INIT_SCRIPT = r"""
import os, shutil, sys, tempfile
home, skel, uid, gid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fresh = not os.listdir(home)
if fresh:
    if os.path.isdir(skel):
        for name in os.listdir(skel):
            src, dst = os.path.join(skel, name), os.path.join(home, name)
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, dst, symlinks=True)
            else:
                shutil.copy2(src, dst, follow_symlinks=False)
    try:
        for root, dirs, files in os.walk(home):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)
        os.chown(home, uid, gid)
    except PermissionError:
        pass  # e.g. root squashed on NFS: the check below says whether it matters
pid = os.fork()
if pid == 0:
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        tempfile.TemporaryFile(dir=home).close()
        os._exit(0)
    except BaseException:
        os._exit(1)
_, status = os.waitpid(pid, 0)
st = os.stat(home)
if os.waitstatus_to_exitcode(status) != 0:
    print(f"the folder is owned by uid {st.st_uid}, gid {st.st_gid} (mode {st.st_mode & 0o7777:o})"
          f" and user {uid} cannot write it", flush=True)
    sys.exit(3)
print("new" if fresh else "ready", flush=True)
"""


def home_init_container(
    home: Home, image: str, name: str, labels: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(create_container kwargs, create_host_config kwargs)`` of the short run that makes a
    new home usable: as root, without network, the home mounted at ``/mnt/nsml-home``; it
    prints ``new`` or ``ready``, or exits 3 with why the notebook user cannot write it."""
    create = {
        "image": image,
        "name": name,
        "entrypoint": ["python3", "-c", HOME_INIT_SCRIPT],
        "command": [HOME_INIT_MOUNT, home.target, str(home.uid), str(home.gid)],
        "user": "0:0",
        "labels": dict(labels),
        "network_disabled": True,
    }
    host = {"binds": {home.source: {"bind": HOME_INIT_MOUNT, "mode": "rw"}}}
    return create, host


def engine_url_for(
    node: str,
    docker_url: str | None,
    *,
    local_node: str,
    overrides: Mapping[str, str],
) -> str | None:
    """The URL of *node*'s Docker engine as the hub reaches it; None for the hub's own engine.

    Order: the admin's override for the node, then the local node (the hub's own engine,
    ``DOCKER_HOST`` or the local socket), then the URL the node's agent advertised.

    Raises:
        NodeUnreachable: a remote node that advertised no URL.
    """
    if node in overrides:
        return overrides[node] or None
    if node == local_node:
        return None
    if docker_url:
        return docker_url
    raise NodeUnreachable(
        f"node {node} advertises no Docker engine URL, so the hub cannot start containers "
        "there. An admin can start its agent with --docker-url tcp://HOST:2376 or set "
        f"c.NSMLSpawner.node_docker_urls = {{{node!r}: 'tcp://HOST:2376'}}."
    )


def server_host(engine_url: str | None) -> str:
    """Where the proxy reaches a server on that engine's node (host networking): the engine's
    host for a TCP engine, else this machine."""
    if engine_url:
        parsed = urlparse(engine_url)
        if parsed.scheme in ("tcp", "http", "https") and parsed.hostname:
            return parsed.hostname
    return "127.0.0.1"


def describe_exit(state: Mapping[str, Any], memory_mib: int) -> LastExit:
    """Why a container stopped, from ``docker inspect``'s ``State`` (not running).

    Args:
        state: the container's ``State``.
        memory_mib: its memory limit in MiB (0 if unknown), for the message.
    """
    code = int(state.get("ExitCode") or 0)
    finished = state.get("FinishedAt") or None
    if finished and str(finished).startswith("0001-01-01"):
        finished = None
    if state.get("OOMKilled"):
        limit = f"its {format_mib(memory_mib)} memory limit" if memory_mib else "its memory limit"
        more = f" (e.g. memory={format_mib(memory_mib * 2)})" if memory_mib else ""
        return LastExit(
            reason="oom_killed",
            exit_code=code or 137,
            message=(
                f"Out of memory: your notebook server used more than {limit} and was stopped "
                f"by the container engine (exit code {code or 137}). Start it again with more "
                f"memory{more}, or use less in your kernels."
            ),
            finished_at=finished,
        )
    error = str(state.get("Error") or "")
    if error:
        return LastExit(
            reason="error",
            exit_code=code,
            message=f"Your notebook server could not run: {error} (exit code {code}).",
            finished_at=finished,
        )
    return LastExit(
        reason="exited",
        exit_code=code,
        message=f"Your notebook server stopped (exit code {code}).",
        finished_at=finished,
    )


_HOME_NOTE = "which holds the home folder: "


def home_news(
    home: Home, previous: str | None, node: str, created: bool, reason: str = ""
) -> tuple[str, str | None]:
    """What a server's start tells its user about the home, and the node that holds the home
    from now on.

    Args:
        home: the user's home.
        previous: the node that held the home volume before this start (None: none known).
        node: the node this server runs on.
        created: the home volume was made on *node* by this start (for a shared folder:
            always True, it is checked on every start).
        reason: the placement's reason, which says why the home node was not chosen.

    A server placed on another node than its home's gets a separate, empty home there (homes
    are not copied); the home stays where the user's files are.
    """
    where = f"your home folder ({home.describe()}, at {home.target})"
    if not home.node_local:
        return f"Mounted {where}: it is on a shared filesystem and kept", previous
    if previous is None or previous == node:
        if previous is not None and created:
            return (
                f"Made a new, empty home folder ({home.describe()}, at {home.target}) on {node}: "
                "the one it held is gone (removed by an admin?)",
                node,
            )
        state = "new, kept when the server stops" if created else "kept from before"
        return f"Mounted {where} on {node} ({state})", node
    why = reason.partition(_HOME_NOTE)[2]
    return (
        f"Your home folder is on {previous}, but this server runs on {node}"
        f"{f' ({why})' if why else ''}. It gets {'a new, empty' if created else 'the separate'} "
        f"home folder kept on {node}; your files on {previous} are there again when your "
        f"server next runs on {previous}.",
        previous,
    )
