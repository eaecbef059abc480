"""Trace replay: the openb protocol of the FGD paper, run through the platform's own policy.

The protocol (``traces/openb/README.md``), step by step:

1. nodes sorted by ``sn``; pods sorted by ``name``;
2. one seeded random stream per run: shuffle the pods; append uniformly drawn copies until the
   arrived GPU demand would exceed 130 % of the cluster's GPU capacity (stop at the first
   draw whose per-GPU ``gpu_milli`` would overshoot, and drop it), or delete uniformly chosen
   pods while it is above; then draw one priority order of the nodes, fixed for the run;
3. place the pods one at a time, never retrying a failure; ties go to the node that comes
   first in the run's priority order;
4. after every pod record arrived and allocated GPU demand; the allocation at ``X`` % arrived
   is the mean of ``round(allocated / (capacity/100), 2)`` over the events with
   ``round(arrived / (capacity/100)) == X``.

Every decision goes through :func:`gpu_scheduler.policy.place` with a
:class:`~gpu_scheduler.model.ClusterSnapshot`; the simulator only keeps the books. Reading
the CSV files is the only I/O; the random stream is injected.
"""

from __future__ import annotations

import csv
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .fgd import PodShape, RecentMix, TypicalMix
from .model import ClusterSnapshot, GpuSnapshot, NodeSnapshot, PlacementRequest
from .policy import DEFAULT_WEIGHTS, Strategy, Weights, place

DEMAND_LIMIT = 1.3
"""Arrived GPU demand the protocol stops at, as a multiple of the cluster's GPU capacity."""


@dataclass(frozen=True, slots=True)
class TraceNode:
    """One row of an openb node list."""

    sn: str
    cpu_milli: int
    memory_mib: int
    gpu: int
    model: str

    def snapshot(self) -> NodeSnapshot:
        """An idle node with ``gpu`` whole GPUs of ``model``."""
        return NodeSnapshot(
            name=self.sn,
            cpu_total_milli=self.cpu_milli,
            memory_total_mib=self.memory_mib,
            gpus=tuple(GpuSnapshot(index=j, model=self.model) for j in range(self.gpu)),
        )


@dataclass(frozen=True, slots=True)
class TracePod:
    """One row of an openb pod list (``num_gpu``/``gpu_milli`` as in the file)."""

    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: tuple[str, ...] = ()

    @property
    def gpu_request(self) -> int:
        """Total GPU milli asked for (0 for CPU-only pods)."""
        return self.num_gpu * self.gpu_milli

    @property
    def shape(self) -> PodShape:
        """The pod's shape as the fragmentation measure sees it."""
        return PodShape(self.cpu_milli, self.num_gpu, self.gpu_milli, self.gpu_spec)

    def request(self) -> PlacementRequest:
        """The pod as a placement request."""
        return PlacementRequest(
            name=self.name,
            gpu_milli=self.gpu_request,
            gpu_models=frozenset(self.gpu_spec),
            cpu_milli=self.cpu_milli,
            memory_mib=self.memory_mib,
        )


def load_nodes(path: str | Path) -> list[TraceNode]:
    """Read an openb node list, sorted by ``sn``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    nodes = [
        TraceNode(
            sn=r["sn"],
            cpu_milli=int(r["cpu_milli"]),
            memory_mib=int(r["memory_mib"]),
            gpu=int(r["gpu"]),
            model=(r.get("model") or "").strip(),
        )
        for r in rows
    ]
    return sorted(nodes, key=lambda n: n.sn)


def load_pods(path: str | Path) -> list[TracePod]:
    """Read an openb pod list, sorted by ``name``.

    CPU-only pods (``num_gpu = 0``) get ``gpu_milli`` 0 and no ``gpu_spec``; a missing
    ``gpu_spec`` column reads as "any model".
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    pods = []
    for r in rows:
        num_gpu = int(r["num_gpu"])
        spec = (r.get("gpu_spec") or "").strip()
        pods.append(
            TracePod(
                name=r["name"],
                cpu_milli=int(r["cpu_milli"]),
                memory_mib=int(r["memory_mib"]),
                num_gpu=num_gpu,
                gpu_milli=int(r["gpu_milli"]) if num_gpu else 0,
                gpu_spec=tuple(sorted(s for s in spec.split("|") if s)) if num_gpu else (),
            )
        )
    return sorted(pods, key=lambda p: p.name)


def gpu_capacity(nodes: Iterable[TraceNode]) -> int:
    """The cluster's GPU capacity in milli-GPU."""
    return sum(n.gpu for n in nodes) * 1000


def arrival_order(pods: Sequence[TracePod], capacity: int, rng: random.Random) -> list[TracePod]:
    """Protocol step 3.1-3.2: shuffle, then resample up to (or trim down to) 130 % demand."""
    arrived = list(pods)
    rng.shuffle(arrived)
    target = DEMAND_LIMIT * capacity
    total = sum(p.gpu_request for p in arrived)
    while total < target:
        p = pods[rng.randrange(len(pods))]
        if total + p.gpu_milli > target:
            break
        arrived.append(p)
        total += p.gpu_request
    while total > target:
        p = arrived.pop(rng.randrange(len(arrived)))
        total -= p.gpu_request
    return arrived


def node_priority(count: int, rng: random.Random) -> list[int]:
    """Protocol step 3.3: one random priority order of the nodes."""
    order = list(range(count))
    rng.shuffle(order)
    return order


def typical_mix_of(pods: Sequence[TracePod], coverage: float = 0.95) -> TypicalMix:
    """FGD's typical pods: the most frequent shapes of ``pods`` covering ``coverage``."""
    return TypicalMix.from_counts(Counter(p.shape for p in pods), coverage)


@dataclass
class Curve:
    """Arrived and allocated GPU milli after each pod event."""

    capacity: int
    arrived: list[int] = field(default_factory=list)
    allocated: list[int] = field(default_factory=list)

    def at(self, percent: int) -> float:
        """Allocation in % of capacity at ``percent`` % arrived demand (protocol step 5)."""
        unit = self.capacity / 100
        bins = [round(a / unit) for a in self.arrived]
        vals = [
            round(al / unit, 2) for b, al in zip(bins, self.allocated, strict=True) if b == percent
        ]
        if not vals:
            vals = [
                round(al / unit, 2)
                for b, al in zip(bins, self.allocated, strict=True)
                if abs(b - percent) <= 1
            ]
        return statistics.fmean(vals) if vals else float("nan")


@dataclass
class RunResult:
    """One replay: the policy, the seed, the curve and counts."""

    strategy: str
    seed: int
    curve: Curve
    placed: int
    failed: int

    def allocation(self, percent: int) -> float:
        """Allocation in % of capacity at ``percent`` % arrived demand."""
        return self.curve.at(percent)


def replay(
    nodes: Sequence[TraceNode],
    pods: Sequence[TracePod],
    rng: random.Random,
    *,
    strategy: Strategy = Strategy.NSML,
    weights: Weights = DEFAULT_WEIGHTS,
    mix_window: int = 10_000,
    mix_refresh: int = 10,
    seed: int = -1,
) -> RunResult:
    """Replay ``pods`` on ``nodes`` under the protocol, placing with ``strategy``.

    ``nsml`` measures fragmentation against the mix of the last ``mix_window`` pods that
    arrived so far (each pod is counted before it is placed, never a later one), recompiled
    every ``mix_refresh`` arrivals. ``fgd`` uses the typical pods of the whole original list,
    as the FGD paper's simulator does. ``bestfit`` uses no mix. ``seed`` only labels the
    result; the stream is ``rng``.
    """
    capacity = gpu_capacity(nodes)
    arrived_pods = arrival_order(pods, capacity, rng)
    order = node_priority(len(nodes), rng)
    snapshot = ClusterSnapshot(nodes[i].snapshot() for i in order)
    static_mix = typical_mix_of(pods) if strategy is Strategy.FGD else None
    recent = RecentMix(window=mix_window, refresh=mix_refresh)
    curve = Curve(capacity)
    arrived = allocated = placed = 0
    for pod in arrived_pods:
        mix: TypicalMix | None = static_mix
        if strategy is Strategy.NSML:
            recent.observe(pod.shape)
            mix = recent.typical()
        result = place(
            snapshot,
            pod.request(),
            mix=mix,
            weights=weights,
            strategy=strategy,
        )
        arrived += pod.gpu_request
        if result.placement is not None:
            snapshot = snapshot.assume(result.placement)
            allocated += pod.gpu_request
            placed += 1
        curve.arrived.append(arrived)
        curve.allocated.append(allocated)
    return RunResult(strategy.value, seed, curve, placed, len(arrived_pods) - placed)


def replay_seed(
    nodes: Sequence[TraceNode],
    pods: Sequence[TracePod],
    seed: int,
    strategy: Strategy = Strategy.NSML,
    weights: Weights = DEFAULT_WEIGHTS,
) -> RunResult:
    """:func:`replay` with a fresh ``random.Random(seed)`` stream."""
    return replay(nodes, pods, random.Random(seed), strategy=strategy, weights=weights, seed=seed)
