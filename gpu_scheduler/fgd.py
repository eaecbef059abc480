"""Fragmentation math: node arrays, the typical request mix and FGD's fragmentation measure.

The measure follows "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with
Fragmentation Gradient Descent" (Weng et al., USENIX ATC'23). Given a mix of *typical* pod
shapes ``p`` with weights ``w_p`` (summing to 1), the fragmentation of a node ``n`` is

    F(n) = Σ_p w_p · f_p(n)

where ``f_p(n)`` is the node's free GPU milli that ``p`` cannot use: all of it when ``p`` asks
for no GPU, excludes the node's model, needs more CPU than is free, or finds fewer than
``num_gpus`` GPUs with at least its ``gpu_milli`` free; otherwise the free milli of the GPUs
that have less than ``p``'s ``gpu_milli`` free. A good placement increases ``F`` the least.

Everything runs over numpy arrays so that one decision over thousands of nodes costs a few
vectorised passes. Nothing here reads a clock, does I/O or draws random numbers.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .model import GPU_MILLI, NodeSnapshot, NodeState, PlacementRequest

if TYPE_CHECKING:
    FloatArray = npt.NDArray[np.float64]
    IntArray = npt.NDArray[np.int64]
else:
    FloatArray = IntArray = Any

_STATE_CODE = {NodeState.UP: 0, NodeState.DRAINING: 1, NodeState.DOWN: 2}


# ---------------------------------------------------------------------------------------------
# Pod shapes and the typical mix
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class PodShape:
    """The resource shape of a request, as the fragmentation measure sees it.

    Attributes:
        cpu_milli: CPU in milli-CPU.
        num_gpus: GPUs occupied (0 for CPU only).
        gpu_milli: milli-GPU taken on each occupied GPU (0 for CPU only).
        models: acceptable GPU models, sorted; empty accepts any.
    """

    cpu_milli: int
    num_gpus: int
    gpu_milli: int
    models: tuple[str, ...] = ()

    @classmethod
    def of(cls, request: PlacementRequest) -> PodShape:
        """The shape of a placement request (models ignored for CPU-only requests)."""
        models = tuple(sorted(request.gpu_models)) if request.num_gpus else ()
        return cls(request.cpu_milli, request.num_gpus, request.per_gpu_milli, models)


@dataclass(frozen=True)
class TypicalMix:
    """Typical pod shapes with weights summing to 1 (FGD's "target workload").

    Build one with :meth:`from_counts`; the numpy tables for a given list of GPU models are
    built on first use and kept.
    """

    shapes: tuple[PodShape, ...]
    weights: tuple[float, ...]
    _tables: dict[tuple[str, ...], MixTable] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_counts(
        cls, counts: Mapping[PodShape, float] | Iterable[tuple[PodShape, float]], coverage: float
    ) -> TypicalMix:
        """Keep the most frequent shapes until they cover ``coverage`` of all requests.

        Weights are each kept shape's share among the kept ones. Ties in frequency keep the
        smaller shape first so that the result does not depend on insertion order.
        """
        items = list(counts.items()) if isinstance(counts, Mapping) else list(counts)
        items = [(s, float(c)) for s, c in items if c > 0]
        if not items:
            return cls((), ())
        items.sort(
            key=lambda sc: (-sc[1], sc[0].cpu_milli, sc[0].num_gpus, sc[0].gpu_milli, sc[0].models)
        )
        total = sum(c for _, c in items)
        kept: list[tuple[PodShape, float]] = []
        acc = 0.0
        for s, c in items:
            kept.append((s, c))
            acc += c
            if acc >= coverage * total - 1e-9:
                break
        kept_total = sum(c for _, c in kept)
        return cls(tuple(s for s, _ in kept), tuple(c / kept_total for _, c in kept))

    def table(self, models: tuple[str, ...]) -> MixTable:
        """The numpy tables of this mix for a cluster whose model ids index ``models``."""
        t = self._tables.get(models)
        if t is None:
            t = MixTable.build(self, models)
            self._tables[models] = t
        return t


class RecentMix:
    """The shapes of the last ``window`` requests, and their typical mix.

    The caller feeds every request it sees to :meth:`observe` (in the server: each submitted
    request; in the simulator: each arriving pod, before it is placed). :meth:`typical` returns
    the mix, rebuilt at most every ``refresh`` observations.
    """

    def __init__(self, window: int = 5000, coverage: float = 0.95, refresh: int = 1) -> None:
        if window < 1 or refresh < 1:
            raise ValueError(f"window and refresh must be >= 1, got {window} and {refresh}")
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage must be within (0, 1], got {coverage}")
        self.window = window
        self.coverage = coverage
        self.refresh = refresh
        self._recent: deque[PodShape] = deque()
        self._counts: Counter[PodShape] = Counter()
        self._mix: TypicalMix | None = None
        self._since = 0

    def __len__(self) -> int:
        return len(self._recent)

    def observe(self, shape: PodShape) -> None:
        """Count one request's shape, forgetting the oldest beyond the window."""
        self._recent.append(shape)
        self._counts[shape] += 1
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        self._since += 1

    def typical(self) -> TypicalMix:
        """The typical mix of the window (an empty mix before any observation)."""
        if self._mix is None or self._since >= self.refresh:
            self._mix = TypicalMix.from_counts(self._counts, self.coverage)
            self._since = 0
        return self._mix


@dataclass(frozen=True)
class MixTable:
    """A typical mix compiled against a cluster's GPU model ids.

    GPU shapes are grouped by ``(gpu_milli, num_gpus)``; ``wtab[u, d, q]`` is the weight of
    the shapes of group ``q`` that model ``u`` satisfies and that need no more CPU than the
    ``d``-th smallest CPU threshold (``d = 0``: none). Row ``u = len(models)`` is for nodes
    without GPUs.
    """

    m_vals: npt.NDArray[np.int64]  # distinct gpu_milli values, (M,)
    q_m: npt.NDArray[np.intp]  # group -> index into m_vals, (Q,)
    q_milli: npt.NDArray[np.int64]  # group -> gpu_milli, (Q,)
    q_k: npt.NDArray[np.int64]  # group -> num_gpus, (Q,)
    cpu_thresholds: npt.NDArray[np.int64]  # sorted distinct cpu_milli of GPU shapes, (D,)
    wtab: npt.NDArray[np.float64]  # (U + 1, D + 1, Q)
    n_shapes: int

    @classmethod
    def build(cls, mix: TypicalMix, models: tuple[str, ...]) -> MixTable:
        """Compile ``mix`` for a cluster whose GPU model ids index ``models``."""
        gpu = [(s, w) for s, w in zip(mix.shapes, mix.weights, strict=True) if s.num_gpus > 0]
        groups = sorted({(s.gpu_milli, s.num_gpus) for s, _ in gpu})
        m_vals = sorted({m for m, _ in groups})
        thresholds = sorted({s.cpu_milli for s, _ in gpu})
        q_index = {g: i for i, g in enumerate(groups)}
        d_index = {c: i for i, c in enumerate(thresholds)}
        model_id = {m: i for i, m in enumerate(models)}
        n_models = len(models)
        # per shape: its group, CPU threshold and the models it accepts
        spec = np.zeros((len(gpu), n_models + 1))
        for i, (s, _) in enumerate(gpu):
            if s.models:
                spec[i, [model_id[m] for m in s.models if m in model_id]] = 1.0
            else:
                spec[i, :n_models] = 1.0
        wtab = np.zeros((n_models + 1, len(thresholds) + 1, len(groups)))
        if gpu:
            q = np.array([q_index[(s.gpu_milli, s.num_gpus)] for s, _ in gpu])
            d = np.array([d_index[s.cpu_milli] + 1 for s, _ in gpu])
            w = np.array([w for _, w in gpu])
            per_shape = spec * w[:, None]  # (shapes, U + 1)
            np.add.at(wtab.transpose(1, 2, 0), (d, q), per_shape)  # a view: adds into wtab
            np.cumsum(wtab, axis=1, out=wtab)
        m_pos = {m: i for i, m in enumerate(m_vals)}
        return cls(
            m_vals=np.array(m_vals, dtype=np.int64),
            q_m=np.array([m_pos[m] for m, _ in groups], dtype=np.intp),
            q_milli=np.array([m for m, _ in groups], dtype=np.int64),
            q_k=np.array([k for _, k in groups], dtype=np.int64),
            cpu_thresholds=np.array(thresholds, dtype=np.int64),
            wtab=wtab,
            n_shapes=len(mix.shapes),
        )

    @property
    def empty(self) -> bool:
        """True when the mix has no shapes (fragmentation is then 0 everywhere)."""
        return self.n_shapes == 0


# ---------------------------------------------------------------------------------------------
# Node arrays
# ---------------------------------------------------------------------------------------------


@dataclass
class NodeArrays:
    """A cluster's nodes as numpy arrays, one row per node in snapshot order.

    GPU columns are padded to the widest node; a padded or unhealthy GPU has ``gpu_model``
    ``-1`` and ``gpu_free`` 0, so it is never chosen and adds nothing to free sums.
    ``node_model`` is the model the fragmentation measure uses for the node (its first healthy
    GPU's; a node with several models is measured as if all were that one).
    """

    names: tuple[str, ...]
    models: tuple[str, ...]
    state: npt.NDArray[np.int8]
    cpu_total: npt.NDArray[np.int64]
    cpu_free: npt.NDArray[np.int64]
    mem_total: npt.NDArray[np.int64]
    mem_free: npt.NDArray[np.int64]
    gpu_free: npt.NDArray[np.int64]
    gpu_model: npt.NDArray[np.int64]
    gpu_index: npt.NDArray[np.int64]
    node_model: npt.NDArray[np.int64]
    _sums: dict[tuple[int, ...], tuple[FloatArray, IntArray]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def n(self) -> int:
        """Number of nodes."""
        return len(self.names)

    @property
    def up(self) -> npt.NDArray[np.bool_]:
        """Nodes that accept work."""
        result: npt.NDArray[np.bool_] = self.state == 0
        return result

    @classmethod
    def from_nodes(cls, nodes: Sequence[NodeSnapshot]) -> NodeArrays:
        """Lay out ``nodes`` (order kept)."""
        models = tuple(sorted({g.model for nd in nodes for g in nd.gpus}))
        model_id = {m: i for i, m in enumerate(models)}
        width = max((len(nd.gpus) for nd in nodes), default=0)
        n = len(nodes)
        gpu_free = np.zeros((n, width), dtype=np.int64)
        gpu_model = np.full((n, width), -1, dtype=np.int64)
        gpu_index = np.full((n, width), -1, dtype=np.int64)
        node_model = np.full(n, -1, dtype=np.int64)
        for i, nd in enumerate(nodes):
            cls._fill_gpus(nd, i, gpu_free, gpu_model, gpu_index, node_model, model_id)
        return cls(
            names=tuple(nd.name for nd in nodes),
            models=models,
            state=np.array([_STATE_CODE[nd.state] for nd in nodes], dtype=np.int8),
            cpu_total=np.array([nd.cpu_total_milli for nd in nodes], dtype=np.int64),
            cpu_free=np.array([nd.cpu_free_milli for nd in nodes], dtype=np.int64),
            mem_total=np.array([nd.memory_total_mib for nd in nodes], dtype=np.int64),
            mem_free=np.array([nd.memory_free_mib for nd in nodes], dtype=np.int64),
            gpu_free=gpu_free,
            gpu_model=gpu_model,
            gpu_index=gpu_index,
            node_model=node_model,
        )

    @staticmethod
    def _fill_gpus(
        nd: NodeSnapshot,
        i: int,
        gpu_free: npt.NDArray[np.int64],
        gpu_model: npt.NDArray[np.int64],
        gpu_index: npt.NDArray[np.int64],
        node_model: npt.NDArray[np.int64],
        model_id: Mapping[str, int],
    ) -> None:
        gpu_free[i, :] = 0
        gpu_model[i, :] = -1
        gpu_index[i, :] = -1
        node_model[i] = -1
        for j, g in enumerate(sorted(nd.gpus, key=lambda g: g.index)):
            gpu_index[i, j] = g.index
            if g.healthy:
                gpu_free[i, j] = g.free_milli
                gpu_model[i, j] = model_id[g.model]
                if node_model[i] < 0:
                    node_model[i] = model_id[g.model]

    def replace_node(self, i: int, node: NodeSnapshot) -> NodeArrays:
        """A copy with row ``i`` rebuilt from ``node`` (same name, GPU models already known).

        Raises ``KeyError`` when the node brings a GPU model or more GPUs than the layout
        has; callers then rebuild the arrays from scratch.
        """
        if len(node.gpus) > self.gpu_free.shape[1]:
            raise KeyError("node has more GPUs than the layout")
        model_id = {m: k for k, m in enumerate(self.models)}
        for g in node.gpus:
            if g.model not in model_id:
                raise KeyError(g.model)
        out = NodeArrays(
            names=self.names,
            models=self.models,
            state=self.state.copy(),
            cpu_total=self.cpu_total.copy(),
            cpu_free=self.cpu_free.copy(),
            mem_total=self.mem_total.copy(),
            mem_free=self.mem_free.copy(),
            gpu_free=self.gpu_free.copy(),
            gpu_model=self.gpu_model.copy(),
            gpu_index=self.gpu_index.copy(),
            node_model=self.node_model.copy(),
        )
        out._sums = self._carry_sums(i, out.gpu_free)
        out.state[i] = _STATE_CODE[node.state]
        out.cpu_total[i] = node.cpu_total_milli
        out.cpu_free[i] = node.cpu_free_milli
        out.mem_total[i] = node.memory_total_mib
        out.mem_free[i] = node.memory_free_mib
        self._fill_gpus(
            node, i, out.gpu_free, out.gpu_model, out.gpu_index, out.node_model, model_id
        )
        return out

    def with_free_row(self, i: int, node: NodeSnapshot) -> NodeArrays:
        """A copy whose free CPU, memory and GPU shares of row ``i`` come from ``node``.

        Only the three free-resource arrays are copied; the rest is shared (never mutated).
        """
        gpu_free = self.gpu_free.copy()
        by_index = {g.index: g for g in node.gpus}
        for j, idx in enumerate(self.gpu_index[i]):
            g = by_index.get(int(idx))
            gpu_free[i, j] = g.free_milli if (g is not None and g.healthy) else 0
        cpu_free = self.cpu_free.copy()
        cpu_free[i] = node.cpu_free_milli
        mem_free = self.mem_free.copy()
        mem_free[i] = node.memory_free_mib
        out = replace(self, cpu_free=cpu_free, mem_free=mem_free, gpu_free=gpu_free)
        out._sums = self._carry_sums(i, gpu_free)
        return out

    def threshold_sums(self, m_vals: npt.NDArray[np.int64]) -> tuple[FloatArray, IntArray]:
        """``(S, C)``: per node and threshold ``m``, the free milli on GPUs with at least
        ``m`` free, and how many such GPUs. Cached per set of thresholds and carried over,
        row by row, to derived arrays."""
        key = tuple(int(m) for m in m_vals)
        hit = self._sums.get(key)
        if hit is None:
            hit = _threshold_sums(self.gpu_free, m_vals)
            self._sums.clear()  # keep the current thresholds only
            self._sums[key] = hit
        return hit

    def _carry_sums(
        self, i: int, gpu_free: npt.NDArray[np.int64]
    ) -> dict[tuple[int, ...], tuple[FloatArray, IntArray]]:
        out = {}
        for key, (s_m, c_m) in self._sums.items():
            s_row, c_row = _threshold_sums(gpu_free[i : i + 1], np.array(key, dtype=np.int64))
            s_new, c_new = s_m.copy(), c_m.copy()
            s_new[i], c_new[i] = s_row[0], c_row[0]
            out[key] = (s_new, c_new)
        return out


# ---------------------------------------------------------------------------------------------
# The fragmentation measure
# ---------------------------------------------------------------------------------------------


@dataclass
class NodeFrag:
    """Per-node intermediate sums for a set of nodes (rows) under one mix table.

    ``s[i, q]`` is the free milli on GPUs with at least group ``q``'s ``gpu_milli`` free and
    ``c[i, q]`` how many such GPUs there are; ``total`` is all free GPU milli.
    """

    total: FloatArray
    s: FloatArray
    c: IntArray


def _threshold_sums(
    gpu_free: npt.NDArray[np.int64], m_vals: npt.NDArray[np.int64]
) -> tuple[FloatArray, IntArray]:
    ge = gpu_free[:, :, None] >= m_vals[None, None, :]
    s_m = np.matmul(gpu_free[:, None, :].astype(np.float64), ge.astype(np.float64))[:, 0, :]
    c_m = np.count_nonzero(ge, axis=1).astype(np.int64)
    return s_m, c_m


def node_sums(
    table: MixTable,
    gpu_free: npt.NDArray[np.int64],
    arrays: NodeArrays | None = None,
    rows: npt.NDArray[np.intp] | None = None,
) -> NodeFrag:
    """The sums of :class:`NodeFrag` for the rows of ``gpu_free``.

    With ``arrays`` and ``rows`` (``gpu_free`` being ``arrays.gpu_free[rows]``) the
    per-threshold sums come from the arrays' cache.
    """
    total = gpu_free.sum(axis=1).astype(np.float64)
    if table.q_milli.size == 0:
        empty = np.zeros((gpu_free.shape[0], 0))
        return NodeFrag(total, empty, empty.astype(np.int64))
    if arrays is not None and rows is not None:
        s_all, c_all = arrays.threshold_sums(table.m_vals)
        s_m, c_m = s_all[rows], c_all[rows]
    else:
        s_m, c_m = _threshold_sums(gpu_free, table.m_vals)
    return NodeFrag(total, s_m[:, table.q_m], c_m[:, table.q_m])


def group_weights(
    table: MixTable, node_model: npt.NDArray[np.int64], cpu: npt.NDArray[np.int64]
) -> FloatArray:
    """``W[i, q]``: weight of group ``q``'s shapes that node ``i`` satisfies by model and CPU."""
    d = np.searchsorted(table.cpu_thresholds, cpu, side="right")
    u = np.where(node_model < 0, table.wtab.shape[0] - 1, node_model)
    result: FloatArray = table.wtab[u, d]
    return result


def fragmentation(
    table: MixTable,
    sums: NodeFrag,
    weights: FloatArray,
) -> FloatArray:
    """``F`` for rows with the given sums and group weights."""
    if table.q_milli.size == 0:
        return sums.total * (0.0 if table.empty else 1.0)
    usable = sums.c >= table.q_k[None, :]
    result: FloatArray = sums.total - np.einsum("iq,iq->i", weights * usable, sums.s)
    return result


def fragmentation_of_nodes(
    table: MixTable,
    gpu_free: npt.NDArray[np.int64],
    node_model: npt.NDArray[np.int64],
    cpu_free: npt.NDArray[np.int64],
) -> FloatArray:
    """``F(n)`` for each row (a convenience over :func:`node_sums` and friends)."""
    sums = node_sums(table, gpu_free)
    return fragmentation(table, sums, group_weights(table, node_model, cpu_free))


def fragmentation_after_whole(
    table: MixTable, sums: NodeFrag, weights_after: FloatArray, k: int
) -> FloatArray:
    """``F`` after taking ``k`` whole GPUs (``k = 0``: CPU only) on each row."""
    if table.empty:
        return np.zeros_like(sums.total)
    total = sums.total - GPU_MILLI * k
    if table.q_milli.size == 0:
        return total
    s = sums.s - GPU_MILLI * k
    c = sums.c - k
    usable = c >= table.q_k[None, :]
    result: FloatArray = total - np.einsum("iq,iq->i", weights_after * usable, s)
    return result


def fragmentation_after_fraction(
    table: MixTable,
    sums: NodeFrag,
    weights_after: FloatArray,
    rows: npt.NDArray[np.intp],
    free_before: npt.NDArray[np.int64],
    milli: int,
) -> FloatArray:
    """``F`` after taking ``milli`` from one GPU, for candidate (row, GPU) pairs.

    ``rows[k]`` indexes ``sums``/``weights_after``; ``free_before[k]`` is the chosen GPU's free
    milli before the placement.
    """
    if table.empty:
        return np.zeros(rows.shape[0])
    total = sums.total[rows] - milli
    if table.q_milli.size == 0:
        return total
    a = free_before[:, None]
    b = a - milli
    m = table.q_milli[None, :]
    ge_a = a >= m
    ge_b = b >= m
    s = sums.s[rows] - a * ge_a + b * ge_b
    c = sums.c[rows] - ge_a + ge_b
    usable = c >= table.q_k[None, :]
    result: FloatArray = total - np.einsum("kq,kq->k", weights_after[rows] * usable, s)
    return result
