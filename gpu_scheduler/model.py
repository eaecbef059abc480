"""Plain values the placement policy reads and returns.

Everything here is an immutable dataclass or an enum: a *snapshot* of the cluster (nodes, their
GPUs, caches and free resources), a *request* for resources, and a *result* that either names a
placement or explains, node by node, why there is none.

Units are fixed across the package: CPU in milli-CPU (1000 = one core), memory in MiB, GPU
capacity in milli-GPU (1000 = one whole GPU), dataset sizes in bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fgd import NodeArrays

GPU_MILLI = 1000
"""Capacity of one GPU in milli-GPU."""


class NodeState(enum.StrEnum):
    """Whether a node accepts new work. Only ``up`` nodes receive placements."""

    UP = "up"
    DRAINING = "draining"
    DOWN = "down"


class Code(enum.StrEnum):
    """Outcome of one placement attempt.

    Mirrors Kubernetes' framework ``Status`` codes and Ray's scheduling classes:

    - ``placed``: a node was chosen (Kubernetes ``Success``).
    - ``unschedulable``: no node can take the request *now*; it may fit once resources are
      released or a node comes back (Kubernetes ``Unschedulable``, Ray ``FAILED``/pending).
    - ``infeasible``: no node of the cluster could take it even when empty (more GPUs, CPU or
      memory than any node has, or a GPU model no node has) — waiting will not help
      (Kubernetes ``UnschedulableAndUnresolvable``, Ray ``INFEASIBLE``).
    """

    PLACED = "placed"
    UNSCHEDULABLE = "unschedulable"
    INFEASIBLE = "infeasible"


def _frozen_map(value: Mapping[str, int] | None) -> Mapping[str, int]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One GPU of a node, as the node's probe reports it plus its free share.

    Attributes:
        index: device index on the node (what ``CUDA_VISIBLE_DEVICES`` takes).
        model: model name; requests match it exactly (e.g. ``"V100M32"``, ``"A100-80GB"``).
        uuid: the device UUID, empty when unknown.
        memory_total_mib: device memory in MiB, 0 when unknown.
        free_milli: unallocated share in milli-GPU, 0..1000; 1000 means the GPU is wholly free.
        nvlink_peers: indices of GPUs on the same node joined to this one by NVLink.
        pcie_group: identifier of the PCIe switch (or root complex) the GPU sits behind, ``None``
            when not reported.
        healthy: ``False`` removes the GPU from placement (it is never chosen).
    """

    index: int
    model: str
    uuid: str = ""
    memory_total_mib: int = 0
    free_milli: int = GPU_MILLI
    nvlink_peers: frozenset[int] = frozenset()
    pcie_group: str | None = None
    healthy: bool = True

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"GPU index must be >= 0, got {self.index}")
        if not 0 <= self.free_milli <= GPU_MILLI:
            raise ValueError(
                f"free_milli must be within 0..{GPU_MILLI}, got {self.free_milli} on GPU "
                f"{self.index}"
            )
        if not isinstance(self.nvlink_peers, frozenset):
            object.__setattr__(self, "nvlink_peers", frozenset(self.nvlink_peers))

    @classmethod
    def from_report(cls, report: Mapping[str, Any], free_milli: int = GPU_MILLI) -> GpuSnapshot:
        """Build from a probe/heartbeat dict (``index``, ``uuid``, ``model``,
        ``memory_total_mib``, ``nvlink_peers``, ``pcie_group``, optional ``healthy``)."""
        return cls(
            index=int(report["index"]),
            model=str(report["model"]),
            uuid=str(report.get("uuid") or ""),
            memory_total_mib=int(report.get("memory_total_mib") or 0),
            free_milli=free_milli,
            nvlink_peers=frozenset(int(p) for p in report.get("nvlink_peers") or ()),
            pcie_group=report.get("pcie_group"),
            healthy=bool(report.get("healthy", True)),
        )


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """What the policy knows about one node at decision time.

    ``cpu_free_milli`` and ``memory_free_mib`` default to the totals (an idle node). The
    caller computes free values from the allocations it holds; the policy never reads a clock
    or a database.

    Attributes:
        name: unique node name; every reason and placement names it.
        cpu_total_milli: allocatable CPU in milli-CPU.
        memory_total_mib: allocatable memory in MiB.
        gpus: the node's GPUs (any order; ``index`` identifies them).
        cpu_free_milli: unallocated CPU in milli-CPU.
        memory_free_mib: unallocated memory in MiB.
        state: only ``up`` nodes receive work.
        datasets: datasets cached on the node, ``"name@version"`` → bytes present.
        images: container image references present on the node.
    """

    name: str
    cpu_total_milli: int
    memory_total_mib: int
    gpus: tuple[GpuSnapshot, ...] = ()
    cpu_free_milli: int = -1
    memory_free_mib: int = -1
    state: NodeState = NodeState.UP
    datasets: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    images: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a node needs a non-empty name")
        if self.cpu_total_milli < 0 or self.memory_total_mib < 0:
            raise ValueError(f"node {self.name}: totals must be >= 0")
        if self.cpu_free_milli < 0:
            object.__setattr__(self, "cpu_free_milli", self.cpu_total_milli)
        if self.memory_free_mib < 0:
            object.__setattr__(self, "memory_free_mib", self.memory_total_mib)
        if self.cpu_free_milli > self.cpu_total_milli:
            raise ValueError(
                f"node {self.name}: cpu_free_milli {self.cpu_free_milli} exceeds "
                f"cpu_total_milli {self.cpu_total_milli}"
            )
        if self.memory_free_mib > self.memory_total_mib:
            raise ValueError(
                f"node {self.name}: memory_free_mib {self.memory_free_mib} exceeds "
                f"memory_total_mib {self.memory_total_mib}"
            )
        if not isinstance(self.gpus, tuple):
            object.__setattr__(self, "gpus", tuple(self.gpus))
        indices = [g.index for g in self.gpus]
        if len(set(indices)) != len(indices):
            raise ValueError(f"node {self.name}: duplicate GPU indices {sorted(indices)}")
        if not isinstance(self.datasets, MappingProxyType):
            object.__setattr__(self, "datasets", _frozen_map(self.datasets))
        if not isinstance(self.images, frozenset):
            object.__setattr__(self, "images", frozenset(self.images))
        if not isinstance(self.state, NodeState):
            object.__setattr__(self, "state", NodeState(self.state))

    @property
    def gpu_free_milli(self) -> int:
        """Sum of the free shares of the node's healthy GPUs."""
        return sum(g.free_milli for g in self.gpus if g.healthy)

    @property
    def models(self) -> frozenset[str]:
        """GPU models present on the node."""
        return frozenset(g.model for g in self.gpus)


@dataclass(frozen=True, slots=True)
class DatasetRef:
    """A dataset version a request mounts, with its size (what copying it would cost)."""

    name: str
    version: str
    bytes: int = 0

    @property
    def key(self) -> str:
        """``name@version``, the key of a node's dataset cache."""
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, ref: str, size: int = 0) -> DatasetRef:
        """Parse ``"name@version"``; a missing version reads as ``"latest"``."""
        name, _, version = ref.partition("@")
        return cls(name=name, version=version or "latest", bytes=size)


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """Resources one session or notebook server asks for.

    ``gpu_milli`` is the *total* GPU ask in milli-GPU: 0 (CPU only), 1..999 (a fraction of one
    GPU, which may share that GPU with other fractions), or a multiple of 1000 (that many whole
    GPUs on one node). Anything else is rejected at construction.

    Attributes:
        name: identity used in messages, e.g. ``"kim/mnist/12"``.
        gpu_milli: total GPU ask in milli-GPU (see above).
        gpu_models: acceptable GPU models; empty accepts any.
        cpu_milli: CPU in milli-CPU.
        memory_mib: memory in MiB.
        datasets: datasets to mount (their cached bytes count in the node's favour).
        image: container image (its presence counts in the node's favour).
        home_node: the node that holds the user's home folder when homes are node-local
            (Docker volumes); that node counts in the request's favour, and a placement
            elsewhere says why (:attr:`Placement.note`). None: no preference (no home, or a
            home on a shared filesystem).
    """

    name: str = ""
    gpu_milli: int = 0
    gpu_models: frozenset[str] = frozenset()
    cpu_milli: int = 0
    memory_mib: int = 0
    datasets: tuple[DatasetRef, ...] = ()
    image: str | None = None
    home_node: str | None = None

    def __post_init__(self) -> None:
        g = self.gpu_milli
        if g < 0 or (g > GPU_MILLI and g % GPU_MILLI):
            raise ValueError(
                f"gpu_milli={g} is not a valid GPU ask: use 0 (CPU only), 1..999 (a fraction of "
                f"one GPU) or a multiple of {GPU_MILLI} (whole GPUs), e.g. 2000 for two GPUs"
            )
        if self.cpu_milli < 0 or self.memory_mib < 0:
            raise ValueError(
                f"cpu_milli and memory_mib must be >= 0, got {self.cpu_milli} and {self.memory_mib}"
            )
        if not isinstance(self.gpu_models, frozenset):
            object.__setattr__(self, "gpu_models", frozenset(self.gpu_models))
        if not isinstance(self.datasets, tuple):
            object.__setattr__(self, "datasets", tuple(self.datasets))

    @classmethod
    def gpus(cls, count: float, **kwargs: Any) -> PlacementRequest:
        """A request for ``count`` GPUs: ``2`` → two whole GPUs, ``0.25`` → 250 milli-GPU."""
        return cls(gpu_milli=round(count * GPU_MILLI), **kwargs)

    @property
    def num_gpus(self) -> int:
        """How many distinct GPUs the request occupies (0, 1 for a fraction, or k)."""
        if self.gpu_milli == 0:
            return 0
        return max(1, self.gpu_milli // GPU_MILLI)

    @property
    def per_gpu_milli(self) -> int:
        """Milli-GPU taken on each occupied GPU (1000 for whole GPUs; 0 for CPU only)."""
        if self.gpu_milli == 0:
            return 0
        return min(self.gpu_milli, GPU_MILLI)

    @property
    def is_fractional(self) -> bool:
        """True for a share of one GPU (0 < gpu_milli < 1000)."""
        return 0 < self.gpu_milli < GPU_MILLI

    @property
    def dataset_bytes(self) -> int:
        """Total bytes of the requested datasets."""
        return sum(d.bytes for d in self.datasets)


@dataclass(frozen=True, slots=True)
class Reason:
    """Why one node cannot take a request, e.g. ``Insufficient gpu: requested 4, free 2 on node-a``.

    Attributes:
        node: the node's name.
        resource: ``gpu``, ``gpu-model``, ``cpu``, ``memory`` or ``node-state``.
        message: the sentence shown to users and written to logs.
        permanent: ``True`` when the node could not take the request even if it were empty and
            up (the request exceeds its capacity, or it has no allowed GPU model).
        requested: the amount asked for, in the resource's unit, when it is a quantity.
        free: the amount free on the node now, when it is a quantity.
    """

    node: str
    resource: str
    message: str
    permanent: bool = False
    requested: int | None = None
    free: int | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request goes.

    Attributes:
        node: the chosen node's name.
        gpu_indices: GPU device indices on that node (one for a fraction, k for k whole GPUs).
        gpu_uuids: the same GPUs' UUIDs (empty strings when unknown).
        gpu_milli_per_gpu: milli-GPU taken on each of those GPUs.
        cpu_milli: CPU reserved, milli-CPU.
        memory_mib: memory reserved, MiB.
        score: the winning node's total score (higher is better).
        score_parts: the weighted parts of that score, by name, for logs and the admin panel.
        note: why the request's home node was not chosen (e.g. ``not on node-a, which holds
            the home: Insufficient gpu: ...``); None when it was, or when none was asked for.
    """

    node: str
    gpu_indices: tuple[int, ...]
    gpu_uuids: tuple[str, ...]
    gpu_milli_per_gpu: int
    cpu_milli: int
    memory_mib: int
    score: float = 0.0
    score_parts: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    note: str | None = None

    @property
    def gpu_milli(self) -> int:
        """Total milli-GPU held."""
        return self.gpu_milli_per_gpu * len(self.gpu_indices)


@dataclass(frozen=True, slots=True)
class PlacementResult:
    """A placement, or a code and every reason, node by node, why there is none.

    Attributes:
        code: ``placed``, ``unschedulable`` or ``infeasible``.
        placement: where the request goes (``None`` unless placed).
        reasons: every reason of every node that cannot take the request; a lazy sequence
            when the policy made it (messages are formatted on first access).
        nodes_total: how many nodes the snapshot had.
        counts: number of nodes per kind of reason (``"Insufficient gpu"`` → 3); derived
            from ``reasons`` when not given.
    """

    code: Code
    placement: Placement | None = None
    reasons: Sequence[Reason] = ()
    nodes_total: int = 0
    counts: Mapping[str, int] | None = None

    @property
    def placed(self) -> bool:
        """True when a node was chosen."""
        return self.code is Code.PLACED

    @property
    def never_fits(self) -> bool:
        """True when waiting cannot help (``infeasible``)."""
        return self.code is Code.INFEASIBLE

    @property
    def message(self) -> str:
        """One line in the style of Kubernetes' ``FailedScheduling`` event.

        ``"0/3 nodes are available: 2 Insufficient gpu, 1 node(s) draining."``
        """
        if self.placement is not None:
            return f"placed on {self.placement.node}"
        counts = self.counts if self.counts is not None else count_reasons(self.reasons)
        return summarize(counts, self.nodes_total, self.code)


def reason_kind(r: Reason) -> str:
    """The summary bucket of a reason: ``Insufficient gpu``, ``node(s) draining`` ..."""
    if r.resource == "node-state":
        return f"node(s) {r.message.rsplit(' ', 1)[-1]}"
    if r.resource == "gpu-model":
        return "node(s) without an allowed GPU model"
    return f"Insufficient {r.resource}"


def count_reasons(reasons: Iterable[Reason]) -> dict[str, int]:
    """Number of reasons per :func:`reason_kind`."""
    counts: dict[str, int] = {}
    for r in reasons:
        kind = reason_kind(r)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def summarize(counts: Mapping[str, int], nodes_total: int, code: Code) -> str:
    """``0/N nodes are available: 2 Insufficient gpu, 1 node(s) draining.``"""
    head = f"0/{nodes_total} nodes are available" if nodes_total else "no nodes are registered"
    ordered = sorted(((k, n) for k, n in counts.items() if n), key=lambda kv: (-kv[1], kv[0]))
    parts = ", ".join(f"{n} {k}" for k, n in ordered)
    tail = " (it can never fit on any node of this cluster)" if code is Code.INFEASIBLE else ""
    return f"{head}: {parts}{tail}." if parts else f"{head}{tail}."


class ClusterSnapshot:
    """The cluster at one instant: its nodes in a stable priority order.

    The order matters: among nodes that score the same, the policy picks the one listed
    first. Keep it stable from one decision to the next (sorted by name, or one fixed shuffled
    order): consistent tie-breaking packs work onto the same nodes and keeps others whole.

    A snapshot never changes. :meth:`assume` and :meth:`release` return a new snapshot with
    one placement's resources taken or given back, so a scheduler pass can place several
    requests in a row without reading the database again. The numpy layout the policy works
    on is built on first use and carried over, row by row, to derived snapshots.
    """

    __slots__ = ("_arrays", "_by_name", "_datasets", "_images", "nodes")

    def __init__(self, nodes: Iterable[NodeSnapshot]) -> None:
        self.nodes: tuple[NodeSnapshot, ...] = tuple(nodes)
        by_name: dict[str, int] = {}
        for i, nd in enumerate(self.nodes):
            if nd.name in by_name:
                raise ValueError(f"duplicate node name {nd.name!r} in the snapshot")
            by_name[nd.name] = i
        self._by_name: Mapping[str, int] = by_name
        self._arrays: Any = None
        self._datasets: dict[str, dict[int, int]] | None = None
        self._images: dict[str, tuple[int, ...]] | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[NodeSnapshot]:
        return iter(self.nodes)

    def __repr__(self) -> str:
        return f"ClusterSnapshot({len(self.nodes)} nodes)"

    def row(self, name: str) -> int:
        """Position of node ``name`` in the priority order."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no node named {name!r} in the snapshot") from None

    def node(self, name: str) -> NodeSnapshot:
        """The node called ``name``."""
        return self.nodes[self.row(name)]

    @property
    def arrays(self) -> NodeArrays:
        """The numpy layout of the nodes (built on first use)."""
        if self._arrays is None:
            from .fgd import NodeArrays

            self._arrays = NodeArrays.from_nodes(self.nodes)
        arrays: NodeArrays = self._arrays
        return arrays

    def dataset_index(self) -> Mapping[str, Mapping[int, int]]:
        """``"name@version"`` → {row: bytes cached on that node}."""
        if self._datasets is None:
            index: dict[str, dict[int, int]] = {}
            for i, nd in enumerate(self.nodes):
                for key, size in nd.datasets.items():
                    index.setdefault(key, {})[i] = size
            self._datasets = index
        return self._datasets

    def image_index(self) -> Mapping[str, tuple[int, ...]]:
        """Image reference → rows of the nodes that have it."""
        if self._images is None:
            rows: dict[str, list[int]] = {}
            for i, nd in enumerate(self.nodes):
                for image in nd.images:
                    rows.setdefault(image, []).append(i)
            self._images = {k: tuple(v) for k, v in rows.items()}
        return self._images

    def _derive(self, i: int, node: NodeSnapshot, same_caches: bool) -> ClusterSnapshot:
        nodes = list(self.nodes)
        nodes[i] = node
        out = ClusterSnapshot.__new__(ClusterSnapshot)
        out.nodes = tuple(nodes)
        out._by_name = self._by_name
        out._arrays = None
        if self._arrays is not None:
            try:
                out._arrays = (
                    self._arrays.with_free_row(i, node)
                    if same_caches
                    else self._arrays.replace_node(i, node)
                )
            except KeyError:
                out._arrays = None
        out._datasets = self._datasets if same_caches else None
        out._images = self._images if same_caches else None
        return out

    def assume(self, placement: Placement) -> ClusterSnapshot:
        """A snapshot with ``placement``'s resources taken from its node.

        Raises ``ValueError`` when the placement does not fit the node (it would over-commit
        a GPU, the CPU or the memory) — two holders never share beyond capacity.
        """
        return self._shift(placement, -1)

    def release(self, placement: Placement) -> ClusterSnapshot:
        """A snapshot with ``placement``'s resources given back to its node.

        Raises ``ValueError`` when that would free more than the node's capacity.
        """
        return self._shift(placement, +1)

    def _shift(self, placement: Placement, sign: int) -> ClusterSnapshot:
        i = self.row(placement.node)
        nd = self.nodes[i]
        verb = "release" if sign > 0 else "take"
        milli = placement.gpu_milli_per_gpu
        wanted = set(placement.gpu_indices)
        gpus = []
        for g in nd.gpus:
            if g.index in wanted:
                free = g.free_milli + sign * milli
                if not 0 <= free <= GPU_MILLI:
                    raise ValueError(
                        f"cannot {verb} {milli} milli-GPU on {nd.name}:gpu{g.index} "
                        f"(free {g.free_milli} of {GPU_MILLI})"
                    )
                g = replace(g, free_milli=free)
                wanted.discard(g.index)
            gpus.append(g)
        if wanted:
            raise ValueError(f"node {nd.name} has no GPU with index {sorted(wanted)}")
        cpu = nd.cpu_free_milli + sign * placement.cpu_milli
        mem = nd.memory_free_mib + sign * placement.memory_mib
        if not 0 <= cpu <= nd.cpu_total_milli:
            raise ValueError(
                f"cannot {verb} {placement.cpu_milli} milli-CPU on {nd.name} "
                f"(free {nd.cpu_free_milli} of {nd.cpu_total_milli})"
            )
        if not 0 <= mem <= nd.memory_total_mib:
            raise ValueError(
                f"cannot {verb} {placement.memory_mib} MiB on {nd.name} "
                f"(free {nd.memory_free_mib} of {nd.memory_total_mib})"
            )
        new = replace(nd, gpus=tuple(gpus), cpu_free_milli=cpu, memory_free_mib=mem)
        return self._derive(i, new, same_caches=True)

    def with_node(self, node: NodeSnapshot) -> ClusterSnapshot:
        """A snapshot with ``node`` replacing the node of the same name, or appended."""
        if node.name in self._by_name:
            return self._derive(self._by_name[node.name], node, same_caches=False)
        return ClusterSnapshot((*self.nodes, node))
