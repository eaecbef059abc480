"""The placement policy: filter the nodes, score the feasible ones, pick a node and its GPUs.

Pure: :func:`place` reads a :class:`~gpu_scheduler.model.ClusterSnapshot` and a
:class:`~gpu_scheduler.model.PlacementRequest` and returns a
:class:`~gpu_scheduler.model.PlacementResult`. No I/O, no clock, no randomness.

Scoring (strategy ``nsml``, the default). Every feasible node gets a score in [0, 1] for each
part, multiplied by the part's weight in points (:class:`Weights`):

- *fragmentation* — ``sigmoid(ΔF / 1000)`` where ``ΔF = F(n) - F(n')`` is how much the
  placement lowers the node's fragmentation measured against the recent request mix (FGD,
  Weng et al., ATC'23; see :mod:`gpu_scheduler.fgd`);
- *best fit* — ``1 - free GPU milli left / largest node's GPU milli``, NSML's "fewest free
  GPUs that still fit";
- *dataset* — the share of the request's dataset bytes already cached on the node;
- *image* — 1 when the request's image is already on the node;
- *home* — 1 on the node that holds the user's home folder (node-local homes), so that a
  notebook server finds its files; a placement elsewhere carries a note that says why the
  home node was not chosen (:func:`home_note`).

Totals are bucketed by
``Weights.tie_resolution`` (``fraction_tie_resolution`` for fractions of a GPU); within a
bucket the node listed first in the snapshot wins.
Consistent tie-breaking is itself a packing heuristic: it fills the same nodes first and keeps
the others whole for large requests.

Inside the chosen node: a fraction goes to the GPU that leaves the least fragmentation
(then the one with the least free share, then the lowest index); whole GPUs are chosen among
the completely free ones, preferring GPUs joined by NVLink, then behind one PCIe switch,
then the lowest indices.

Strategies ``bestfit`` and ``fgd`` reproduce the two published baselines of the FGD paper
exactly (scores, GPU choice, tie-breaking) for comparisons in the simulator.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, overload

import numpy as np
import numpy.typing as npt
from traitlets import Float, Integer, TraitError, Unicode, validate
from traitlets.config import Configurable

from .fgd import (
    MixTable,
    NodeArrays,
    RecentMix,
    TypicalMix,
    fragmentation,
    fragmentation_after_fraction,
    fragmentation_after_whole,
    group_weights,
    node_sums,
)
from .model import (
    GPU_MILLI,
    ClusterSnapshot,
    Code,
    GpuSnapshot,
    NodeSnapshot,
    NodeState,
    Placement,
    PlacementRequest,
    PlacementResult,
    Reason,
)

FRAGMENTATION_SCALE = 1000.0
"""Milli-GPU of fragmentation change that moves the sigmoid by one unit (FGD's constant)."""

_EMPTY_MIX = TypicalMix((), ())


class Strategy(enum.StrEnum):
    """Which scoring to use.

    - ``nsml``: the weighted score described in the module docstring (the platform's policy).
    - ``bestfit``: the FGD paper's BestFit baseline,
      ``⌊100·(1 - ½·cpu_left/cpu_max - ½·gpu_left/gpu_max)⌋``.
    - ``fgd``: the FGD paper's score ``⌊100·sigmoid(ΔF/1000)⌋`` with its GPU choice.
    """

    NSML = "nsml"
    BESTFIT = "bestfit"
    FGD = "fgd"


@dataclass(frozen=True, slots=True)
class Weights:
    """Weights of the ``nsml`` score, in points (see :class:`PlacementPolicy` for each)."""

    fragmentation: float = 100.0
    best_fit: float = 0.0
    dataset: float = 20.0
    image: float = 5.0
    home: float = 200.0
    tie_resolution: float = 2.0
    fraction_tie_resolution: float = 1.0
    fragmentation_scale: float = FRAGMENTATION_SCALE

    def __post_init__(self) -> None:
        for name in ("fragmentation", "best_fit", "dataset", "image", "home"):
            value = getattr(self, name)
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f"weight {name}={value!r} must be a finite number >= 0")
        if not (self.fragmentation_scale > 0 and np.isfinite(self.fragmentation_scale)):
            raise ValueError(
                f"fragmentation_scale={self.fragmentation_scale!r} must be a finite number > 0 "
                "(milli-GPU, e.g. 1000)"
            )
        for name in ("tie_resolution", "fraction_tie_resolution"):
            value = getattr(self, name)
            if not (value > 0 and np.isfinite(value)):
                raise ValueError(
                    f"{name}={value!r} must be a finite number > 0 (1.0 buckets totals by "
                    "whole points)"
                )


DEFAULT_WEIGHTS = Weights()


# ---------------------------------------------------------------------------------------------
# Filter
# ---------------------------------------------------------------------------------------------


@dataclass
class _Fit:
    """Feasibility of one request on every node (rows of the snapshot)."""

    ok: npt.NDArray[np.bool_]
    gpu_fit: npt.NDArray[np.bool_] | None  # (N, G): GPU column may take the request's share
    usable: npt.NDArray[np.bool_] | None  # (N, G): healthy GPU of an allowed model


def _allowed_models(arrays: NodeArrays, models: frozenset[str]) -> npt.NDArray[np.bool_]:
    """Lookup table model id → allowed; the extra last entry (id -1) is never allowed."""
    allowed = np.zeros(len(arrays.models) + 1, dtype=bool)
    if models:
        for k, name in enumerate(arrays.models):
            allowed[k] = name in models
    else:
        allowed[: len(arrays.models)] = True
    return allowed


def _fit(arrays: NodeArrays, request: PlacementRequest) -> _Fit:
    ok = (
        arrays.up & (arrays.cpu_free >= request.cpu_milli) & (arrays.mem_free >= request.memory_mib)
    )
    k = request.num_gpus
    if k == 0:
        return _Fit(ok, None, None)
    usable = _allowed_models(arrays, request.gpu_models)[arrays.gpu_model]
    if request.is_fractional:
        gpu_fit = usable & (arrays.gpu_free >= request.gpu_milli)
        ok &= gpu_fit.any(axis=1)
    else:
        gpu_fit = usable & (arrays.gpu_free >= GPU_MILLI)
        ok &= gpu_fit.sum(axis=1) >= k
    return _Fit(ok, gpu_fit, usable)


# ---------------------------------------------------------------------------------------------
# Score
# ---------------------------------------------------------------------------------------------


@dataclass
class _Scored:
    """Scores of the feasible rows and, for a fraction, each row's best GPU column."""

    rows: npt.NDArray[np.intp]
    key: npt.NDArray[np.float64]  # the value compared between nodes (higher wins)
    total: npt.NDArray[np.float64]  # the reported score
    parts: dict[str, npt.NDArray[np.float64]]
    column: npt.NDArray[np.intp] | None  # best GPU column per row (fractions only)


def _best_per_row(
    n_rows: int, cand_row: npt.NDArray[np.intp], order_key: npt.NDArray[np.float64]
) -> npt.NDArray[np.intp]:
    """Index of the candidate with the highest ``order_key`` for each row (first on ties).

    ``cand_row`` is sorted ascending and covers every row in ``0..n_rows-1``.
    """
    starts = np.flatnonzero(np.r_[True, cand_row[1:] != cand_row[:-1]])
    best = np.maximum.reduceat(order_key, starts)
    hit = order_key == best[cand_row]
    # first hit of each row: positions of hits, keep the first per row
    hit_pos = np.flatnonzero(hit)
    first = np.r_[True, cand_row[hit_pos[1:]] != cand_row[hit_pos[:-1]]]
    chosen: npt.NDArray[np.intp] = hit_pos[first]
    assert chosen.shape[0] == n_rows
    return chosen


def _frag_delta(
    arrays: NodeArrays,
    rows: npt.NDArray[np.intp],
    request: PlacementRequest,
    fit: _Fit,
    table: MixTable,
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.intp] | None,
    npt.NDArray[np.intp] | None,
    npt.NDArray[np.int64] | None,
]:
    """``ΔF = F(n) - F(n')`` per row, or per candidate (row, GPU column) for a fraction.

    Returns ``(delta, cand_row, cand_col, cand_free)``; the last three are ``None`` unless the
    request is a fraction, in which case ``delta`` is per candidate.
    """
    gpu_free = arrays.gpu_free[rows]
    sums = node_sums(table, gpu_free, arrays, rows)
    node_model = arrays.node_model[rows]
    cpu = arrays.cpu_free[rows]
    before = fragmentation(table, sums, group_weights(table, node_model, cpu))
    w_after = group_weights(table, node_model, cpu - request.cpu_milli)
    if not request.is_fractional:
        after = fragmentation_after_whole(table, sums, w_after, request.num_gpus)
        return before - after, None, None, None
    assert fit.gpu_fit is not None
    # GPUs of one node with equal free shares are interchangeable: keep the lowest column
    width = gpu_free.shape[1]
    earlier = np.tril(np.ones((width, width), dtype=bool), k=-1)  # earlier[j, j'] = j' < j
    same = gpu_free[:, :, None] == gpu_free[:, None, :]
    duplicate = (same & earlier[None, :, :]).any(axis=2)
    cand_row, cand_col = np.nonzero(fit.gpu_fit[rows] & ~duplicate)
    cand_free = gpu_free[cand_row, cand_col]
    after = fragmentation_after_fraction(
        table, sums, w_after, cand_row, cand_free, request.gpu_milli
    )
    return before[cand_row] - after, cand_row, cand_col, cand_free


def _sigmoid(
    delta: npt.NDArray[np.float64], scale: float = FRAGMENTATION_SCALE
) -> npt.NDArray[np.float64]:
    result: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-delta / scale))
    return result


def _score_fgd(
    arrays: NodeArrays,
    rows: npt.NDArray[np.intp],
    request: PlacementRequest,
    fit: _Fit,
    table: MixTable,
) -> _Scored:
    delta, cand_row, cand_col, _ = _frag_delta(arrays, rows, request, fit, table)
    points = np.floor(100.0 * _sigmoid(delta))
    column = None
    if cand_row is not None and cand_col is not None:
        pick = _best_per_row(rows.size, cand_row, points)  # lowest column on ties
        points = points[pick]
        column = cand_col[pick]
    return _Scored(rows, points, points, {"fragmentation": points}, column)


def _score_bestfit(
    arrays: NodeArrays, rows: npt.NDArray[np.intp], request: PlacementRequest, fit: _Fit
) -> _Scored:
    cpu_norm = max(int(arrays.cpu_total.max(initial=0)), 1)
    gpu_norm = max(arrays.gpu_free.shape[1], 1) * GPU_MILLI
    cpu_left = arrays.cpu_free[rows] - request.cpu_milli
    gpu_left = arrays.gpu_free[rows].sum(axis=1) - request.gpu_milli
    points = np.floor(100.0 * (1.0 - 0.5 * cpu_left / cpu_norm - 0.5 * gpu_left / gpu_norm))
    column = None
    if request.is_fractional:
        assert fit.gpu_fit is not None
        column = _least_free_column(arrays, rows, fit.gpu_fit)
    return _Scored(rows, points, points, {"best_fit": points}, column)


def _least_free_column(
    arrays: NodeArrays, rows: npt.NDArray[np.intp], gpu_fit: npt.NDArray[np.bool_]
) -> npt.NDArray[np.intp]:
    """Per row, the fitting GPU column with the least free share (lowest column on ties)."""
    free = np.where(gpu_fit[rows], arrays.gpu_free[rows], np.iinfo(np.int64).max)
    column: npt.NDArray[np.intp] = np.argmin(free, axis=1)
    return column


def _score_nsml(
    snapshot: ClusterSnapshot,
    rows: npt.NDArray[np.intp],
    request: PlacementRequest,
    fit: _Fit,
    table: MixTable,
    weights: Weights,
) -> _Scored:
    arrays = snapshot.arrays
    parts: dict[str, npt.NDArray[np.float64]] = {}
    total = np.zeros(rows.size)
    column = None
    if weights.fragmentation > 0:
        delta, cand_row, cand_col, cand_free = _frag_delta(arrays, rows, request, fit, table)
        if cand_row is not None and cand_col is not None and cand_free is not None:
            # best ΔF per row; ties to the GPU with the least free share, then lowest column
            order = np.round(delta, 6) * 4096.0 - cand_free.astype(np.float64)
            pick = _best_per_row(rows.size, cand_row, order)
            delta = delta[pick]
            column = cand_col[pick]
        frag = weights.fragmentation * _sigmoid(delta, weights.fragmentation_scale)
        parts["fragmentation"] = frag
        total += frag
    elif request.is_fractional:
        assert fit.gpu_fit is not None
        column = _least_free_column(arrays, rows, fit.gpu_fit)
    if weights.best_fit > 0:
        gpu_norm = max(arrays.gpu_free.shape[1], 1) * GPU_MILLI
        gpu_left = arrays.gpu_free[rows].sum(axis=1) - request.gpu_milli
        bf = weights.best_fit * (1.0 - gpu_left / gpu_norm)
        parts["best_fit"] = bf
        total += bf
    if weights.dataset > 0 and request.datasets and request.dataset_bytes > 0:
        cached = np.zeros(arrays.n)
        index = snapshot.dataset_index()
        for d in request.datasets:
            for r, size in index.get(d.key, {}).items():
                cached[r] += min(size, d.bytes)
        data = weights.dataset * cached[rows] / request.dataset_bytes
        parts["dataset"] = data
        total += data
    if weights.image > 0 and request.image:
        present = np.zeros(arrays.n)
        present[list(snapshot.image_index().get(request.image, ()))] = 1.0
        img = weights.image * present[rows]
        parts["image"] = img
        total += img
    if weights.home > 0 and request.home_node:
        home = (rows == _row_or_none(snapshot, request.home_node)).astype(np.float64)
        parts["home"] = weights.home * home
        total += parts["home"]
    resolution = (
        weights.fraction_tie_resolution if request.is_fractional else weights.tie_resolution
    )
    key = np.floor(total / resolution + 1e-9)
    return _Scored(rows, key, total, parts, column)


def _row_or_none(snapshot: ClusterSnapshot, name: str) -> int:
    """The row of node *name*, or -1 when the snapshot has no such node."""
    try:
        return snapshot.row(name)
    except KeyError:
        return -1


def home_note(snapshot: ClusterSnapshot, request: PlacementRequest, chosen: str) -> str | None:
    """Why *request*'s home node was not chosen, for the placement's reason.

    None when the request names no home node or when *chosen* is it. Otherwise one clause:
    the home node's own reasons (``Insufficient gpu: requested 1, free 0 on node-a``), or
    that it is not in the cluster, or that another node scored higher (possible only when
    the home weight is lowered).
    """
    home = request.home_node
    if not home or chosen == home:
        return None
    head = f"not on {home}, which holds the home folder"
    row = _row_or_none(snapshot, home)
    if row < 0:
        return f"{head}: {home} is not a node of this cluster any more"
    reasons = node_reasons(snapshot.nodes[row], request)
    if reasons:
        return f"{head}: " + "; ".join(str(r) for r in reasons)
    return f"{head}: {chosen} scored higher (PlacementPolicy.home_weight)"


# ---------------------------------------------------------------------------------------------
# GPUs inside the chosen node
# ---------------------------------------------------------------------------------------------


def choose_gpus(candidates: Sequence[GpuSnapshot], count: int) -> tuple[int, ...]:
    """Pick ``count`` GPUs among ``candidates`` (all free), keeping them close together.

    Without topology information the lowest indices win. With it, the set with the most
    NVLink-joined pairs wins, then the most pairs behind one PCIe switch, then the lowest
    indices. Exact for up to 8 candidates choosing any count, greedy beyond.
    """
    gpus = sorted(candidates, key=lambda g: g.index)
    if count >= len(gpus):
        return tuple(g.index for g in gpus[:count])
    if not any(g.nvlink_peers or g.pcie_group is not None for g in gpus):
        return tuple(g.index for g in gpus[:count])

    def affinity(group: Sequence[GpuSnapshot]) -> tuple[int, int]:
        nvlink = sum(
            1
            for a, b in itertools.combinations(group, 2)
            if b.index in a.nvlink_peers or a.index in b.nvlink_peers
        )
        pcie = sum(
            1
            for a, b in itertools.combinations(group, 2)
            if a.pcie_group is not None and a.pcie_group == b.pcie_group
        )
        return nvlink, pcie

    if len(gpus) <= 8:
        best = max(
            itertools.combinations(gpus, count),
            key=lambda c: (*affinity(c), [-g.index for g in c]),
        )
        return tuple(g.index for g in best)
    # greedy: grow from each seed GPU, adding the GPU that adds the most affinity
    options = []
    for seed in gpus:
        group = [seed]
        while len(group) < count:
            rest = [g for g in gpus if g not in group]
            nxt = max(rest, key=lambda g: (*affinity([*group, g]), -g.index))
            group.append(nxt)
        group.sort(key=lambda g: g.index)
        options.append(group)
    best_group = max(options, key=lambda c: (*affinity(c), [-g.index for g in c]))
    return tuple(g.index for g in best_group)


# ---------------------------------------------------------------------------------------------
# Reasons
# ---------------------------------------------------------------------------------------------


def node_reasons(node: NodeSnapshot, request: PlacementRequest) -> list[Reason]:
    """Every reason ``node`` cannot take ``request`` now (empty when it can).

    A reason is *permanent* when the node could not take the request even empty and up.
    """
    out: list[Reason] = []
    name = node.name
    if node.state is not NodeState.UP:
        out.append(Reason(name, "node-state", f"{name} is {node.state.value}"))
    k = request.num_gpus
    if k:
        healthy = [g for g in node.gpus if g.healthy]
        allowed = [g for g in healthy if not request.gpu_models or g.model in request.gpu_models]
        if not allowed:
            if request.gpu_models:
                have = ", ".join(sorted({g.model for g in healthy})) or "no GPUs"
                want = ", ".join(sorted(request.gpu_models))
                out.append(
                    Reason(
                        name,
                        "gpu-model",
                        f"No allowed GPU model on {name}: requested one of {want}, node has {have}",
                        permanent=True,
                    )
                )
            else:
                out.append(
                    Reason(
                        name,
                        "gpu",
                        f"Insufficient gpu: requested {_gpu_words(request)}, {name} has no GPUs",
                        permanent=True,
                        requested=request.gpu_milli,
                        free=0,
                    )
                )
        elif request.is_fractional:
            largest = max(g.free_milli for g in allowed)
            if largest < request.gpu_milli:
                out.append(
                    Reason(
                        name,
                        "gpu",
                        f"Insufficient gpu: requested {request.gpu_milli} milli-GPU, largest "
                        f"free share {largest} on {name}",
                        requested=request.gpu_milli,
                        free=largest,
                    )
                )
        elif len(allowed) < k:
            out.append(
                Reason(
                    name,
                    "gpu",
                    f"Insufficient gpu: requested {k}, {name} has {len(allowed)}"
                    f"{_model_words(request)} in total",
                    permanent=True,
                    requested=k,
                    free=len(allowed),
                )
            )
        else:
            free = sum(1 for g in allowed if g.free_milli >= GPU_MILLI)
            if free < k:
                out.append(
                    Reason(
                        name,
                        "gpu",
                        f"Insufficient gpu: requested {k}, free {free}{_model_words(request)} "
                        f"on {name}",
                        requested=k,
                        free=free,
                    )
                )
    out += _quantity_reason(
        name, "cpu", "milli-CPU", request.cpu_milli, node.cpu_free_milli, node.cpu_total_milli
    )
    out += _quantity_reason(
        name, "memory", "MiB", request.memory_mib, node.memory_free_mib, node.memory_total_mib
    )
    return out


def _gpu_words(request: PlacementRequest) -> str:
    if request.is_fractional:
        return f"{request.gpu_milli} milli-GPU"
    return str(request.num_gpus)


def _model_words(request: PlacementRequest) -> str:
    if not request.gpu_models:
        return ""
    return " of " + "|".join(sorted(request.gpu_models))


def _quantity_reason(
    node: str, resource: str, unit: str, requested: int, free: int, total: int
) -> list[Reason]:
    if requested > total:
        return [
            Reason(
                node,
                resource,
                f"Insufficient {resource}: requested {requested} {unit}, {node} has {total} "
                "in total",
                permanent=True,
                requested=requested,
                free=free,
            )
        ]
    if requested > free:
        return [
            Reason(
                node,
                resource,
                f"Insufficient {resource}: requested {requested} {unit}, free {free} on {node}",
                requested=requested,
                free=free,
            )
        ]
    return []


def explain(snapshot: ClusterSnapshot, request: PlacementRequest) -> tuple[Code, list[Reason]]:
    """Every reason, node by node, why ``request`` does not fit now, and the resulting code.

    ``infeasible`` when every node has a permanent reason (or there are no nodes),
    ``unschedulable`` otherwise (``placed`` when some node has no reason at all).
    """
    reasons: list[Reason] = []
    never = True
    fits = False
    for nd in snapshot.nodes:
        rs = node_reasons(nd, request)
        reasons += rs
        fits = fits or not rs
        if not any(r.permanent for r in rs):
            never = False
    if fits:
        return Code.PLACED, reasons
    return (Code.INFEASIBLE if never else Code.UNSCHEDULABLE), reasons


class NodeReasons(Sequence[Reason]):
    """The reasons of the given nodes, formatted as they are read.

    Deciding that nothing fits takes a few vectorised passes; formatting a sentence for each
    of thousands of nodes takes longer, so sentences are made on demand: reading the first
    five formats only as many nodes as needed, and ``len()`` is known without formatting.
    """

    __slots__ = ("_built", "_length", "_next", "_nodes", "_request")

    def __init__(
        self, nodes: Sequence[NodeSnapshot], request: PlacementRequest, length: int | None = None
    ) -> None:
        self._nodes = nodes
        self._request = request
        self._length = length
        self._built: list[Reason] = []
        self._next = 0

    def _extend(self, upto: int | None) -> None:
        while (upto is None or len(self._built) < upto) and self._next < len(self._nodes):
            self._built += node_reasons(self._nodes[self._next], self._request)
            self._next += 1

    def __len__(self) -> int:
        if self._length is None:
            self._extend(None)
            self._length = len(self._built)
        return self._length

    @overload
    def __getitem__(self, index: int) -> Reason: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Reason]: ...

    def __getitem__(self, index: int | slice) -> Reason | Sequence[Reason]:
        if isinstance(index, slice):
            start, stop, step = index.start or 0, index.stop, index.step or 1
            prefix = stop is not None and stop >= 0 and start >= 0 and step > 0
            self._extend(stop if prefix else None)
            return tuple(self._built[index])
        self._extend(index + 1 if index >= 0 else None)
        return self._built[index]

    def __iter__(self) -> Iterator[Reason]:
        i = 0
        while True:
            self._extend(i + 1)
            if i >= len(self._built):
                return
            yield self._built[i]
            i += 1

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"NodeReasons({list(self)!r})"


def _failure(
    arrays: NodeArrays, request: PlacementRequest, fit: _Fit
) -> tuple[Code, dict[str, int]]:
    """The code of a request no node takes now, and the number of nodes per kind of reason.

    Mirrors :func:`node_reasons` over the arrays (a test keeps the two in step).
    """
    n = arrays.n
    counts: dict[str, int] = {
        "node(s) draining": int(np.count_nonzero(arrays.state == 1)),
        "node(s) down": int(np.count_nonzero(arrays.state == 2)),
        "Insufficient cpu": int(np.count_nonzero(arrays.cpu_free < request.cpu_milli)),
        "Insufficient memory": int(np.count_nonzero(arrays.mem_free < request.memory_mib)),
    }
    permanent = (arrays.cpu_total < request.cpu_milli) | (arrays.mem_total < request.memory_mib)
    k = request.num_gpus
    if k and fit.usable is not None:
        n_allowed = fit.usable.sum(axis=1)
        none = n_allowed == 0
        if request.gpu_models:
            counts["node(s) without an allowed GPU model"] = int(np.count_nonzero(none))
            gpu_short = np.zeros(n, dtype=bool)
        else:
            gpu_short = none.copy()
        permanent |= none
        if request.is_fractional:
            largest = np.where(fit.usable, arrays.gpu_free, -1).max(axis=1, initial=-1)
            gpu_short |= ~none & (largest < request.gpu_milli)
        else:
            too_few = ~none & (n_allowed < k)
            permanent |= too_few
            free_whole = (fit.usable & (arrays.gpu_free >= GPU_MILLI)).sum(axis=1)
            gpu_short |= too_few | (~none & (n_allowed >= k) & (free_whole < k))
        counts["Insufficient gpu"] = int(np.count_nonzero(gpu_short))
    never = n == 0 or bool(permanent.all())
    return (Code.INFEASIBLE if never else Code.UNSCHEDULABLE), counts


# ---------------------------------------------------------------------------------------------
# Place
# ---------------------------------------------------------------------------------------------


def place(
    snapshot: ClusterSnapshot,
    request: PlacementRequest,
    *,
    mix: TypicalMix | None = None,
    weights: Weights = DEFAULT_WEIGHTS,
    strategy: Strategy = Strategy.NSML,
) -> PlacementResult:
    """Choose a node and GPUs for ``request``, or say why none fits.

    Args:
        snapshot: the cluster; ties go to the node listed first.
        request: what to place.
        mix: the typical request mix the fragmentation score is measured against (e.g.
            ``RecentMix.typical()``); ``None`` scores no fragmentation.
        weights: the ``nsml`` score's weights.
        strategy: ``nsml`` (default), or a published baseline for comparisons.

    Returns:
        ``placed`` with a :class:`Placement`; otherwise ``unschedulable`` (may fit later) or
        ``infeasible`` (can never fit), with every reason of every node (formatted lazily)
        and the count of nodes per kind of reason.
    """
    arrays = snapshot.arrays
    fit = _fit(arrays, request)
    rows = np.flatnonzero(fit.ok)
    if rows.size == 0:
        code, counts = _failure(arrays, request, fit)
        reasons = NodeReasons(snapshot.nodes, request, length=sum(counts.values()))
        return PlacementResult(code, None, reasons, len(snapshot), counts)
    table = (mix or _EMPTY_MIX).table(arrays.models)
    if strategy is Strategy.FGD:
        scored = _score_fgd(arrays, rows, request, fit, table)
    elif strategy is Strategy.BESTFIT:
        scored = _score_bestfit(arrays, rows, request, fit)
    else:
        scored = _score_nsml(snapshot, rows, request, fit, table, weights)
    best = int(np.argmax(scored.key))
    row = int(rows[best])
    node = snapshot.nodes[row]
    if request.num_gpus == 0:
        chosen: tuple[int, ...] = ()
    elif scored.column is not None:
        chosen = (int(arrays.gpu_index[row, scored.column[best]]),)
    else:
        assert fit.gpu_fit is not None
        free_idx = {int(arrays.gpu_index[row, j]) for j in np.flatnonzero(fit.gpu_fit[row])}
        chosen = choose_gpus([g for g in node.gpus if g.index in free_idx], request.num_gpus)
    uuid = {g.index: g.uuid for g in node.gpus}
    placement = Placement(
        node=node.name,
        gpu_indices=chosen,
        gpu_uuids=tuple(uuid[i] for i in chosen),
        gpu_milli_per_gpu=request.per_gpu_milli,
        cpu_milli=request.cpu_milli,
        memory_mib=request.memory_mib,
        score=float(scored.total[best]),
        score_parts=MappingProxyType({k: float(v[best]) for k, v in scored.parts.items()}),
        note=home_note(snapshot, request, node.name),
    )
    return PlacementResult(Code.PLACED, placement, (), len(snapshot))


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


class PlacementPolicy(Configurable):
    """The placement policy's knobs, configurable from ``jupyterhub_config.py``.

    A thin holder: :meth:`weights` and :meth:`recent_mix` turn the traits into the plain
    values that :func:`place` takes, e.g. ``c.PlacementPolicy.dataset_weight = 20``.
    """

    strategy = Unicode(
        Strategy.NSML.value,
        config=True,
        help="""Scoring strategy: 'nsml' (default; fragmentation-aware with data and image
        locality), 'bestfit' or 'fgd' (the FGD paper's baselines, for comparisons). Only
        'nsml' uses the weights below.""",
    )

    fragmentation_weight = Float(
        100.0,
        config=True,
        help="""Points for leaving little fragmentation behind, in points per unit of
        sigmoid(ΔF / fragmentation_scale), where ΔF is how much the placement lowers the
        node's fragmentation (milli-GPU) measured against the recent request mix, as in FGD.
        With the default 100, a placement that leaves fragmentation unchanged scores 50, one
        that strands a further whole GPU ~27, one that removes a whole GPU of fragmentation
        ~73. 0 turns it off. It does not guarantee that a large request finds a whole node
        later; it makes that more likely for the mix of requests seen recently.""",
    )

    fragmentation_scale = Float(
        FRAGMENTATION_SCALE,
        config=True,
        help="""Milli-GPU of fragmentation change that moves the sigmoid by one unit. Default
        1000 (one GPU), as in FGD. Larger values flatten the score (more decisions settled by
        node order), smaller ones sharpen it.""",
    )

    best_fit_weight = Float(
        0.0,
        config=True,
        help="""Points for NSML's best fit, "fewest free GPUs that still fit": this many for a
        node left with no free GPU, 0 for one left with as many free GPUs as the largest node
        has. Default 0: the fragmentation score and the stable node order already pack;
        raise it to favour nearly full nodes more strongly.""",
    )

    dataset_weight = Float(
        20.0,
        config=True,
        help="""Points for a node that already caches all of the request's dataset bytes
        (proportionally fewer for part of them). Default 20: a fully cached dataset outweighs
        about a GPU's worth of extra fragmentation. 0 ignores caches. It does not guarantee
        the cache is still there when the session starts.""",
    )

    image_weight = Float(
        5.0,
        config=True,
        help="""Points for a node where the request's container image is already present.
        Default 5. Pulls are avoided where the other parts are close; it does not pin images
        to nodes.""",
    )

    home_weight = Float(
        200.0,
        config=True,
        help="""Points for the node that holds the user's home folder, when homes are
        node-local Docker volumes (NSMLSpawner.home_volume). Default 200: more than all other
        parts together, so a home node that can take the server gets it; a server placed
        elsewhere (the home node is full, down or draining) starts with a separate, empty home
        there, and its spawn progress says why. 0 ignores homes. Homes on a shared filesystem
        name no node and are not affected.""",
    )

    tie_resolution = Float(
        2.0,
        config=True,
        help="""Width, in points, of the buckets in which the total scores of nodes are
        compared for whole-GPU and CPU-only requests; nodes in the same bucket are settled by
        their order in the snapshot (a stable order packs work onto the same nodes). Default
        2.0. Larger values pack more by node order, smaller ones follow the score more
        closely. It does not make ties impossible.""",
    )

    fraction_tie_resolution = Float(
        1.0,
        config=True,
        help="""The same width for requests of a fraction of one GPU. Default 1.0 (FGD's own
        rounding to whole points): where a fraction lands decides which later fractions still
        fit, so their scores are compared more finely than those of whole-GPU requests.""",
    )

    mix_window = Integer(
        10_000,
        config=True,
        help="""How many of the most recent requests make up the request mix the
        fragmentation score is measured against. Default 10000. The mix only reflects
        requests already seen; a sudden change of workload takes a window to show.""",
    )

    mix_coverage = Float(
        0.95,
        config=True,
        help="""Share of recent requests the typical shapes must cover (the most frequent
        shapes are kept until they do), in (0, 1]. Default 0.95, as in FGD. Higher values
        consider rarer shapes and cost more time per decision.""",
    )

    @validate("strategy")
    def _validate_strategy(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        valid = [s.value for s in Strategy]
        if value not in valid:
            raise TraitError(f"strategy={value!r} is not one of {valid}")
        return value

    @validate(
        "fragmentation_weight", "best_fit_weight", "dataset_weight", "image_weight", "home_weight"
    )
    def _validate_weight(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        name = getattr(proposal["trait"], "name", "weight")
        if not (value >= 0 and np.isfinite(value)):
            raise TraitError(f"{name}={value!r} must be a finite number >= 0, e.g. 10.0")
        return value

    @validate("tie_resolution", "fraction_tie_resolution", "fragmentation_scale")
    def _validate_positive(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        name = getattr(proposal["trait"], "name", "value")
        if not (value > 0 and np.isfinite(value)):
            raise TraitError(f"{name}={value!r} must be a finite number > 0, e.g. 2.0")
        return value

    @validate("mix_window")
    def _validate_window(self, proposal: dict[str, Any]) -> int:
        value = int(proposal["value"])
        if value < 1:
            raise TraitError(f"mix_window={value!r} must be >= 1, e.g. 10000")
        return value

    @validate("mix_coverage")
    def _validate_coverage(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        if not 0.0 < value <= 1.0:
            raise TraitError(f"mix_coverage={value!r} must be within (0, 1], e.g. 0.95")
        return value

    def weights(self) -> Weights:
        """The configured weights as a plain value."""
        return Weights(
            fragmentation=self.fragmentation_weight,
            best_fit=self.best_fit_weight,
            dataset=self.dataset_weight,
            image=self.image_weight,
            home=self.home_weight,
            tie_resolution=self.tie_resolution,
            fraction_tie_resolution=self.fraction_tie_resolution,
            fragmentation_scale=self.fragmentation_scale,
        )

    def recent_mix(self) -> RecentMix:
        """An empty request-mix accumulator with the configured window and coverage."""
        return RecentMix(window=self.mix_window, coverage=self.mix_coverage)

    def place(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, mix: TypicalMix | None
    ) -> PlacementResult:
        """:func:`place` with this configuration."""
        return place(
            snapshot, request, mix=mix, weights=self.weights(), strategy=Strategy(self.strategy)
        )
