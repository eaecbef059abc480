"""The placement policy, as a specification: each case names the rule it checks."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from traitlets import TraitError

from gpu_scheduler import (
    ClusterSnapshot,
    Code,
    DatasetRef,
    GpuSnapshot,
    NodeSnapshot,
    NodeState,
    PlacementPolicy,
    PlacementRequest,
    PodShape,
    RecentMix,
    Strategy,
    TypicalMix,
    Weights,
    choose_gpus,
    explain,
    place,
)
from gpu_scheduler.fgd import NodeArrays, fragmentation_of_nodes
from gpu_scheduler.model import count_reasons


def node(
    name: str,
    gpus: int = 8,
    *,
    free: Sequence[int] | None = None,
    model: str = "A100",
    cpu: int = 64_000,
    mem: int = 256_000,
    cpu_free: int = -1,
    mem_free: int = -1,
    state: NodeState = NodeState.UP,
    datasets: dict[str, int] | None = None,
    images: Sequence[str] = (),
    nvlink: Mapping[int, Sequence[int]] | None = None,
    pcie: Mapping[int, str] | None = None,
) -> NodeSnapshot:
    """A node with ``gpus`` GPUs of ``model``; ``free`` gives each GPU's free milli."""
    shares = list(free) if free is not None else [1000] * gpus
    return NodeSnapshot(
        name=name,
        cpu_total_milli=cpu,
        memory_total_mib=mem,
        cpu_free_milli=cpu_free,
        memory_free_mib=mem_free,
        state=state,
        datasets=datasets or {},
        images=frozenset(images),
        gpus=tuple(
            GpuSnapshot(
                index=i,
                model=model,
                uuid=f"GPU-{name}-{i}",
                free_milli=f,
                nvlink_peers=frozenset((nvlink or {}).get(i, ())),
                pcie_group=(pcie or {}).get(i),
            )
            for i, f in enumerate(shares)
        ),
    )


def gpus(count: float, **kw: object) -> PlacementRequest:
    """A request for ``count`` GPUs (fractions allowed) with modest CPU and memory."""
    kw.setdefault("cpu_milli", 4000)
    kw.setdefault("memory_mib", 8192)
    return PlacementRequest.gpus(count, **kw)


# A request mix with single GPUs, halves and whole 8-GPU jobs: the shapes a platform sees.
MIX = TypicalMix.from_counts(
    {
        PodShape(4000, 1, 1000): 50,
        PodShape(4000, 1, 500): 20,
        PodShape(32000, 8, 1000): 10,
        PodShape(8000, 0, 0): 5,
    },
    coverage=1.0,
)


@dataclass
class Case:
    """One placement scenario: the cluster, the request and the node that must win."""

    id: str
    nodes: list[NodeSnapshot]
    request: PlacementRequest
    node: str | None
    gpu_indices: tuple[int, ...] | None = None
    strategy: Strategy = Strategy.NSML
    mix: TypicalMix | None = field(default_factory=lambda: MIX)


PLACEMENT_CASES = [
    Case(
        "8-GPU node kept whole when a 1-GPU job fits elsewhere",
        [node("big-8", 8), node("small-2", 2, free=[1000, 0])],
        gpus(1),
        "small-2",
    ),
    Case(
        "8-GPU node kept whole when a 1-GPU job fits elsewhere (BestFit baseline)",
        [node("big-8", 8), node("small-2", 2, free=[1000, 0])],
        gpus(1),
        "small-2",
        strategy=Strategy.BESTFIT,
    ),
    Case(
        "8-GPU node kept whole when a 1-GPU job fits elsewhere (FGD baseline)",
        [node("big-8", 8), node("small-2", 2, free=[1000, 0])],
        gpus(1),
        "small-2",
        strategy=Strategy.FGD,
    ),
    Case(
        "half-GPU job shares a half-used GPU instead of opening a whole one",
        [node("whole", 2), node("half-used", 2, free=[500, 0])],
        gpus(0.5),
        "half-used",
        (0,),
    ),
    Case(
        "fraction goes to the GPU with the least free share that fits",
        [node("a", 4, free=[1000, 700, 300, 600])],
        gpus(0.25),
        "a",
        (2,),
    ),
    Case(
        "whole-GPU request takes only completely free GPUs",
        [node("a", 4, free=[999, 1000, 500, 1000])],
        gpus(2),
        "a",
        (1, 3),
    ),
    Case(
        "model constraints honoured: the only allowed model wins even listed last",
        [node("a100", 8, model="A100"), node("v100", 8, model="V100")],
        gpus(1, gpu_models={"V100"}),
        "v100",
    ),
    Case(
        "model constraints honoured for fractions",
        [node("t4", 2, model="T4", free=[500, 500]), node("a10", 2, model="A10")],
        gpus(0.5, gpu_models={"A10"}),
        "a10",
    ),
    Case(
        "draining and down nodes receive nothing",
        [
            node("draining", 8, state=NodeState.DRAINING),
            node("down", 8, state=NodeState.DOWN),
            node("up", 8, free=[1000] + [0] * 7),
        ],
        gpus(1),
        "up",
    ),
    Case(
        "CPU-only job avoids the GPU node whose CPU a GPU job needs",
        [node("gpu-tight", 8, cpu=36_000), node("cpu-rich", 2, cpu=128_000)],
        PlacementRequest(cpu_milli=8000, memory_mib=8192),
        "cpu-rich",
    ),
    Case(
        "without a request mix, ties go to the node listed first",
        [node("first", 8), node("second", 8)],
        gpus(1),
        "first",
        mix=None,
    ),
]


@pytest.mark.parametrize("case", PLACEMENT_CASES, ids=[c.id for c in PLACEMENT_CASES])
def test_placement(case: Case) -> None:
    result = place(ClusterSnapshot(case.nodes), case.request, mix=case.mix, strategy=case.strategy)
    if case.node is None:
        assert result.placement is None
        return
    assert result.code is Code.PLACED, result.message
    assert result.placement is not None
    assert result.placement.node == case.node
    if case.gpu_indices is not None:
        assert result.placement.gpu_indices == case.gpu_indices


@pytest.mark.parametrize(
    ("weights", "winner"),
    [
        pytest.param(
            Weights(), "cached", id="dataset-cached node preferred at equal fragmentation"
        ),
        pytest.param(Weights(dataset=0), "plain", id="dataset weight 0 ignores the cache"),
    ],
)
def test_dataset_locality(weights: Weights, winner: str) -> None:
    nodes = [node("plain", 8), node("cached", 8, datasets={"mnist@3": 40 << 30})]
    request = gpus(1, datasets=(DatasetRef("mnist", "3", 40 << 30),))
    result = place(ClusterSnapshot(nodes), request, mix=MIX, weights=weights)
    assert result.placement is not None and result.placement.node == winner


def test_partly_cached_dataset_counts_its_share() -> None:
    nodes = [
        node("quarter", 8, datasets={"imagenet@1": 25}),
        node("three-quarters", 8, datasets={"imagenet@1": 75}),
    ]
    request = gpus(1, datasets=(DatasetRef("imagenet", "1", 100),))
    result = place(ClusterSnapshot(nodes), request, mix=MIX)
    assert result.placement is not None
    assert result.placement.node == "three-quarters"
    assert result.placement.score_parts["dataset"] == pytest.approx(Weights().dataset * 0.75)


def test_image_present_preferred_at_equal_fragmentation() -> None:
    nodes = [node("no-image", 8), node("has-image", 8, images=["nsml/pytorch:2.3"])]
    result = place(ClusterSnapshot(nodes), gpus(1, image="nsml/pytorch:2.3"), mix=MIX)
    assert result.placement is not None and result.placement.node == "has-image"


@pytest.mark.parametrize(
    ("nodes", "request_", "code"),
    [
        pytest.param(
            [node("a", 8)],
            gpus(16),
            Code.INFEASIBLE,
            id="more GPUs than any node has: can never fit",
        ),
        pytest.param(
            [node("a", 8)],
            gpus(1, gpu_models={"H100"}),
            Code.INFEASIBLE,
            id="unknown GPU model: can never fit",
        ),
        pytest.param(
            [node("a", 8, cpu=32_000)],
            gpus(1, cpu_milli=64_000),
            Code.INFEASIBLE,
            id="more CPU than any node has: can never fit",
        ),
        pytest.param(
            [node("a", 8, mem=1024)],
            gpus(1, memory_mib=4096),
            Code.INFEASIBLE,
            id="more memory than any node has: can never fit",
        ),
        pytest.param(
            [node("a", 8, free=[1000, 1000] + [0] * 6)],
            gpus(4),
            Code.UNSCHEDULABLE,
            id="GPUs busy: not now",
        ),
        pytest.param(
            [node("a", 8, cpu_free=1000)], gpus(1), Code.UNSCHEDULABLE, id="CPU busy: not now"
        ),
        pytest.param(
            [node("a", 8, state=NodeState.DRAINING)],
            gpus(1),
            Code.UNSCHEDULABLE,
            id="only a draining node is big enough: not now",
        ),
        pytest.param(
            [node("small", 2), node("big", 8, free=[0] * 8)],
            gpus(4),
            Code.UNSCHEDULABLE,
            id="one node could take it when free: not now",
        ),
        pytest.param([], gpus(1), Code.INFEASIBLE, id="no nodes at all: can never fit"),
    ],
)
def test_can_never_fit_vs_not_now(
    nodes: list[NodeSnapshot], request_: PlacementRequest, code: Code
) -> None:
    result = place(ClusterSnapshot(nodes), request_, mix=MIX)
    assert result.code is code
    assert result.never_fits is (code is Code.INFEASIBLE)
    assert explain(ClusterSnapshot(nodes), request_)[0] is code


def test_summary_counts_agree_with_the_reasons_on_random_clusters() -> None:
    """The vectorised failure path and the per-node sentences never disagree."""
    rng = random.Random(3)
    models = ["A100", "T4", "V100"]
    for _ in range(300):
        nodes = [
            node(
                f"n{i}",
                free=[rng.choice([0, 0, 250, 500, 1000]) for _ in range(rng.choice([0, 1, 2, 4]))],
                model=rng.choice(models),
                cpu=rng.choice([4000, 16000]),
                cpu_free=rng.choice([-1, 0, 2000]),
                mem=rng.choice([8192, 65536]),
                mem_free=rng.choice([-1, 0, 4096]),
                state=rng.choice(list(NodeState)),
            )
            for i in range(rng.randint(0, 4))
        ]
        request = gpus(
            rng.choice([0, 0.25, 0.5, 1, 2, 4]),
            cpu_milli=rng.choice([1000, 8000, 32000]),
            memory_mib=rng.choice([1024, 16384, 131072]),
            gpu_models=frozenset(rng.sample([*models, "H100"], rng.choice([0, 1, 2]))),
        )
        snap = ClusterSnapshot(nodes)
        result = place(snap, request, mix=MIX)
        code, reasons = explain(snap, request)
        assert result.code is code
        if not result.placed:
            assert len(result.reasons) == len(reasons)  # known before any sentence is made
            assert list(result.reasons) == reasons
            assert result.reasons[:2] == tuple(reasons[:2])
            assert result.counts is not None
            assert {k: v for k, v in result.counts.items() if v} == count_reasons(reasons)


@pytest.mark.parametrize(
    ("nodes", "request_", "expected"),
    [
        pytest.param(
            [node("node-a", 8, free=[1000, 1000] + [0] * 6)],
            gpus(4),
            ["Insufficient gpu: requested 4, free 2 on node-a"],
            id="whole GPUs busy",
        ),
        pytest.param(
            [node("node-a", 2)],
            gpus(4),
            ["Insufficient gpu: requested 4, node-a has 2 in total"],
            id="too few GPUs ever",
        ),
        pytest.param(
            [node("node-a", 1, free=[100])],
            gpus(0.25),
            ["Insufficient gpu: requested 250 milli-GPU, largest free share 100 on node-a"],
            id="fraction larger than every free share",
        ),
        pytest.param(
            [node("node-a", 8, cpu_free=2000, mem_free=100)],
            gpus(1),
            [
                "Insufficient cpu: requested 4000 milli-CPU, free 2000 on node-a",
                "Insufficient memory: requested 8192 MiB, free 100 on node-a",
            ],
            id="several resources short: one reason each",
        ),
        pytest.param(
            [node("node-a", 8, model="T4")],
            gpus(1, gpu_models={"A100", "H100"}),
            ["No allowed GPU model on node-a: requested one of A100, H100, node has T4"],
            id="wrong GPU model",
        ),
        pytest.param(
            [node("node-a", 8, state=NodeState.DOWN, free=[0] * 8)],
            gpus(1),
            ["node-a is down", "Insufficient gpu: requested 1, free 0 on node-a"],
            id="down node lists its state and what it lacks",
        ),
    ],
)
def test_every_rejection_names_the_node_and_the_resource(
    nodes: list[NodeSnapshot], request_: PlacementRequest, expected: list[str]
) -> None:
    result = place(ClusterSnapshot(nodes), request_, mix=MIX)
    assert result.placement is None
    assert [str(r) for r in result.reasons] == expected
    assert all(r.node == "node-a" for r in result.reasons)


def test_rejection_lists_every_node_and_a_summary() -> None:
    nodes = [
        node("a", 8, free=[0] * 8),
        node("b", 8, state=NodeState.DRAINING),
        node("c", 8, free=[0] * 8),
    ]
    result = place(ClusterSnapshot(nodes), gpus(1), mix=MIX)
    assert {r.node for r in result.reasons} == {"a", "b", "c"}
    assert result.message == "0/3 nodes are available: 2 Insufficient gpu, 1 node(s) draining."


def test_fractional_gpus_never_exceed_1000_milli() -> None:
    """Random fractions placed until nothing fits: no GPU is ever over-committed."""
    rng = random.Random(7)
    snap = ClusterSnapshot([node("a", 2), node("b", 1), node("c", 4, free=[300, 1000, 0, 50])])
    mix = RecentMix(coverage=1.0)
    for _ in range(200):
        request = gpus(rng.choice([0.1, 0.25, 0.3, 0.5, 0.7, 0.9]), cpu_milli=10, memory_mib=10)
        mix.observe(PodShape.of(request))
        result = place(snap, request, mix=mix.typical())
        if result.placement is None:
            assert result.code is Code.UNSCHEDULABLE
            continue
        assert len(result.placement.gpu_indices) == 1
        snap = snap.assume(result.placement)
        for nd in snap:
            assert all(0 <= g.free_milli <= 1000 for g in nd.gpus)
    free = [g.free_milli for nd in snap for g in nd.gpus]
    assert max(free) < 100  # the cluster was filled with fractions as far as they fit


def test_over_committing_a_gpu_is_refused() -> None:
    snap = ClusterSnapshot([node("a", 1)])
    p = place(snap, gpus(0.6), mix=MIX).placement
    assert p is not None
    snap = snap.assume(p)
    with pytest.raises(ValueError, match=r"cannot take 600 milli-GPU on a:gpu0"):
        snap.assume(p)
    assert snap.release(p).node("a").gpus[0].free_milli == 1000


def test_assume_then_release_restores_the_snapshot_and_its_arrays() -> None:
    snap = ClusterSnapshot([node("a", 8), node("b", 2)])
    before = snap.arrays.gpu_free.copy()
    p = place(snap, gpus(3), mix=MIX).placement
    assert p is not None
    after = snap.assume(p)
    assert after.arrays.gpu_free.sum() == before.sum() - 3000
    back = after.release(p)
    assert np.array_equal(back.arrays.gpu_free, before)
    assert np.array_equal(NodeArrays.from_nodes(back.nodes).gpu_free, before)
    assert np.array_equal(snap.arrays.gpu_free, before)  # the original never changes


@pytest.mark.parametrize(
    ("nvlink", "pcie", "free", "count", "expected"),
    [
        pytest.param(
            {0: [1], 1: [0], 2: [3], 3: [2], 4: [5], 5: [4]},
            None,
            [1000, 0, 1000, 1000, 1000, 0],
            2,
            (2, 3),
            id="GPUs chosen inside a node share NVLink",
        ),
        pytest.param(
            None,
            {0: "sw0", 1: "sw1", 2: "sw0", 3: "sw1"},
            [0, 1000, 1000, 1000],
            2,
            (1, 3),
            id="without NVLink, GPUs behind one PCIe switch",
        ),
        pytest.param(
            None,
            None,
            [0, 1000, 1000, 1000],
            2,
            (1, 2),
            id="without topology, the lowest free indices",
        ),
        pytest.param(
            {i: [j for j in range(4) if j != i] for i in range(4)}
            | {i: [j for j in range(4, 8) if j != i] for i in range(4, 8)},
            None,
            [1000, 0, 0, 1000, 1000, 1000, 1000, 1000],
            4,
            (4, 5, 6, 7),
            id="a 4-GPU job takes a whole NVLink island",
        ),
    ],
)
def test_gpus_inside_a_node(
    nvlink: dict[int, list[int]] | None,
    pcie: dict[int, str] | None,
    free: list[int],
    count: int,
    expected: tuple[int, ...],
) -> None:
    nd = node("a", len(free), free=free, nvlink=nvlink, pcie=pcie)
    result = place(ClusterSnapshot([nd]), gpus(count), mix=MIX)
    assert result.placement is not None
    assert result.placement.gpu_indices == expected
    assert result.placement.gpu_uuids == tuple(f"GPU-a-{i}" for i in expected)


def test_choose_gpus_beyond_eight_candidates_keeps_nvlink_groups() -> None:
    pairs = {i: [i ^ 1] for i in range(16)}
    candidates = [
        GpuSnapshot(index=i, model="A100", nvlink_peers=frozenset(pairs[i]))
        for i in range(16)
        if i not in (0, 3)
    ]
    assert choose_gpus(candidates, 2) == (4, 5)


def test_unhealthy_gpus_are_never_chosen() -> None:
    nd = NodeSnapshot(
        name="a",
        cpu_total_milli=8000,
        memory_total_mib=8192,
        gpus=(GpuSnapshot(0, "A100", healthy=False), GpuSnapshot(1, "A100")),
    )
    result = place(ClusterSnapshot([nd]), gpus(1, cpu_milli=1, memory_mib=1), mix=MIX)
    assert result.placement is not None and result.placement.gpu_indices == (1,)
    result = place(ClusterSnapshot([nd]), gpus(2, cpu_milli=1, memory_mib=1), mix=MIX)
    assert result.code is Code.INFEASIBLE


def test_decisions_are_deterministic() -> None:
    nodes = [node(f"n{i}", 8, free=[1000, 500, 250, 0] * 2) for i in range(20)]
    requests = [gpus(x) for x in (0.25, 0.5, 1, 2, 0.75)]
    first = [place(ClusterSnapshot(nodes), r, mix=MIX) for r in requests]
    again = [place(ClusterSnapshot(nodes), r, mix=MIX) for r in requests]
    assert first == again


@pytest.mark.parametrize(
    ("gpu_free", "cpu_free", "expected"),
    [
        pytest.param([1000] * 8, 64_000, 8000 * (5 / 85), id="empty node: only CPU-only shape"),
        pytest.param(
            [500, 0, 0, 0, 0, 0, 0, 0],
            64_000,
            500 * (5 / 85) + 500 * (50 / 85) + 500 * (10 / 85),
            id="half GPU: useless to whole-GPU and 8-GPU shapes",
        ),
        pytest.param([1000] * 8, 2_000, 8000.0, id="no CPU left: every free GPU is stranded"),
        pytest.param([0] * 8, 64_000, 0.0, id="full node: nothing to fragment"),
    ],
)
def test_fragmentation_measure(gpu_free: list[int], cpu_free: int, expected: float) -> None:
    """F(n) = Σ_p w_p·f_p(n), FGD's measure, against MIX (weights 50/20/10/5 of 85)."""
    table = MIX.table(("A100",))
    value = fragmentation_of_nodes(
        table,
        np.array([gpu_free], dtype=np.int64),
        np.array([0], dtype=np.int64),
        np.array([cpu_free], dtype=np.int64),
    )
    assert value[0] == pytest.approx(expected)


def test_typical_mix_keeps_the_most_frequent_shapes_until_coverage() -> None:
    counts = {PodShape(1, 1, 1000): 60, PodShape(1, 1, 500): 30, PodShape(1, 0, 0): 10}
    mix = TypicalMix.from_counts(counts, coverage=0.9)
    assert mix.shapes == (PodShape(1, 1, 1000), PodShape(1, 1, 500))
    assert mix.weights == pytest.approx((60 / 90, 30 / 90))


def test_recent_mix_forgets_beyond_its_window() -> None:
    recent = RecentMix(window=3, coverage=1.0)
    for shape in [PodShape(1, 8, 1000)] + [PodShape(1, 1, 1000)] * 3:
        recent.observe(shape)
    assert recent.typical().shapes == (PodShape(1, 1, 1000),)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"gpu_milli": 1500}, id="1.5 GPUs is neither a fraction nor whole GPUs"),
        pytest.param({"gpu_milli": -1}, id="negative GPU"),
        pytest.param({"cpu_milli": -5}, id="negative CPU"),
    ],
)
def test_invalid_requests_are_rejected_with_the_fix(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"must be|use 0"):
        PlacementRequest(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("trait", "value", "message"),
    [
        ("fragmentation_weight", -1.0, "must be a finite number >= 0"),
        ("dataset_weight", float("nan"), "must be a finite number >= 0"),
        ("tie_resolution", 0.0, "must be a finite number > 0"),
        ("fraction_tie_resolution", -1.0, "must be a finite number > 0"),
        ("fragmentation_scale", float("inf"), "must be a finite number > 0"),
        ("strategy", "random", "is not one of"),
        ("mix_window", 0, "must be >= 1"),
        ("mix_coverage", 1.5, "within"),
    ],
)
def test_policy_knobs_are_validated_on_assignment(trait: str, value: object, message: str) -> None:
    policy = PlacementPolicy()
    with pytest.raises(TraitError, match=message):
        setattr(policy, trait, value)


def test_policy_knobs_become_plain_values() -> None:
    policy = PlacementPolicy(dataset_weight=25.0, tie_resolution=2.0)
    assert policy.weights() == Weights(dataset=25.0, tie_resolution=2.0)
    snap = ClusterSnapshot([node("a", 8)])
    assert policy.place(snap, gpus(1), MIX).placed
    assert policy.recent_mix().window == policy.mix_window
