"""The trace simulator follows the openb protocol and runs the policy's own code."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from gpu_scheduler import Strategy
from gpu_scheduler.sim import (
    Curve,
    TraceNode,
    TracePod,
    arrival_order,
    gpu_capacity,
    load_nodes,
    load_pods,
    node_priority,
    replay,
    replay_seed,
    typical_mix_of,
)

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "openb"
NODES = TRACES / "openb_node_list_gpu_node.csv"
DEFAULT = TRACES / "openb_pod_list_default.csv"
BASELINES = TRACES / "baselines_allocation.csv"

needs_traces = pytest.mark.skipif(
    not NODES.exists(), reason=f"the openb traces are not at {TRACES}"
)


def pod(name: str, num_gpu: int, gpu_milli: int, cpu: int = 1000) -> TracePod:
    return TracePod(name, cpu, 1024, num_gpu, gpu_milli if num_gpu else 0)


SMALL_NODES = [TraceNode(f"n{i}", 32_000, 131_072, 4, "T4") for i in range(5)]  # 20 GPUs


@pytest.mark.parametrize(
    ("pods", "expect_originals"),
    [
        pytest.param(
            [pod("a", 1, 1000), pod("b", 1, 500), pod("c", 0, 0)],
            True,
            id="demand below 130 %: originals kept, copies appended",
        ),
        pytest.param(
            [pod(f"p{i}", 2, 1000) for i in range(20)],
            False,
            id="demand above 130 %: uniformly chosen pods deleted",
        ),
    ],
)
def test_arrivals_stop_at_130_percent_of_capacity(
    pods: list[TracePod], expect_originals: bool
) -> None:
    capacity = gpu_capacity(SMALL_NODES)
    arrived = arrival_order(pods, capacity, random.Random(42))
    demand = sum(p.gpu_request for p in arrived)
    assert demand <= 1.3 * capacity
    if expect_originals:
        assert sorted(p.name for p in arrived[: len(pods)]) == sorted(p.name for p in pods)
        assert demand > 1.3 * capacity - 1000  # stopped at the first overshooting draw
    else:
        assert demand > 1.3 * capacity - 2000


def test_one_seed_gives_one_stream() -> None:
    pods = [pod("a", 1, 1000), pod("b", 1, 250)]
    capacity = gpu_capacity(SMALL_NODES)
    first = arrival_order(pods, capacity, random.Random(7)), node_priority(5, random.Random(7))
    again = arrival_order(pods, capacity, random.Random(7)), node_priority(5, random.Random(7))
    assert first == again
    assert sorted(first[1]) == list(range(5))


@pytest.mark.parametrize(
    ("arrived", "allocated", "percent", "expected"),
    [
        pytest.param(
            [100, 140, 160], [100, 140, 160], 1, 1.2, id="mean over the events that round to X"
        ),
        pytest.param(
            [150, 250, 260], [150, 250, 260], 2, 2.0, id="half to even: 1.5 and 2.5 both round to 2"
        ),
        pytest.param([100, 300], [100, 200], 2, 1.5, id="no event at X: use X ± 1"),
    ],
)
def test_curve_binning(
    arrived: list[int], allocated: list[int], percent: int, expected: float
) -> None:
    curve = Curve(capacity=10_000, arrived=arrived, allocated=allocated)
    assert curve.at(percent) == pytest.approx(expected)


def test_small_cluster_replay_places_within_capacity() -> None:
    pods = [pod(f"p{i}", 1, m) for i, m in enumerate([1000, 500, 250, 750] * 5)]
    for strategy in Strategy:
        result = replay(SMALL_NODES, pods, random.Random(1), strategy=strategy)
        assert result.placed + result.failed == len(result.curve.arrived)
        assert 0 < result.curve.allocated[-1] <= gpu_capacity(SMALL_NODES)


@needs_traces
def test_trace_files_load_as_the_protocol_says() -> None:
    nodes = load_nodes(NODES)
    pods = load_pods(DEFAULT)
    assert len(nodes) == 1213 and gpu_capacity(nodes) == 6_212_000
    assert [n.sn for n in nodes] == sorted(n.sn for n in nodes)
    assert len(pods) == 8152 and [p.name for p in pods] == sorted(p.name for p in pods)
    assert sum(1 for p in pods if p.num_gpu == 0) == 1088
    assert all(p.gpu_milli == 0 and not p.gpu_spec for p in pods if p.num_gpu == 0)
    mix = typical_mix_of(pods)
    assert sum(mix.weights) == pytest.approx(1.0)


def published_curve(workload: str, policy: str, seed: int) -> dict[int, float]:
    with open(BASELINES, newline="") as f:
        for row in csv.DictReader(f):
            if (row["workload"], row["sc_policy"], row["seed"]) == (workload, policy, str(seed)):
                return {int(k): float(v) for k, v in row.items() if k.isdigit()}
    raise LookupError((workload, policy, seed))


@needs_traces
def test_simulator_reproduces_the_published_bestfit_curve_on_one_seed() -> None:
    """Same protocol, a different random stream: within 0.5 pp at every point from 10 %."""
    published = published_curve("openb_pod_list_default", "05-BestFit", 42)
    result = replay_seed(load_nodes(NODES), load_pods(DEFAULT), 42, Strategy.BESTFIT)
    for x in (10, 30, 50, 70, 80, 90, 95, 100, 110, 120, 130):
        assert result.allocation(x) == pytest.approx(published[x], abs=0.5), x


@needs_traces
def test_our_policy_beats_bestfit_in_the_same_run_on_a_cluster_slice() -> None:
    nodes = load_nodes(NODES)[::6]  # ~200 nodes of every kind; 130 % demand scales with them
    pods = load_pods(DEFAULT)
    ours = replay_seed(nodes, pods, 42, Strategy.NSML)
    bestfit = replay_seed(nodes, pods, 42, Strategy.BESTFIT)
    assert ours.allocation(130) > bestfit.allocation(130)
