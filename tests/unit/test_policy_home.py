"""A notebook server goes where its user's home is, and says why when it cannot.

Homes are Docker volumes on one node in the embedded default: a server placed elsewhere
starts with a separate, empty home. The policy prefers the node named ``home_node``, as it
prefers nodes that cache a request's datasets, and a placement elsewhere carries a note
with the home node's own reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gpu_scheduler import (
    ClusterSnapshot,
    GpuSnapshot,
    NodeSnapshot,
    NodeState,
    PlacementPolicy,
    PlacementRequest,
    RecentMix,
    Weights,
    place,
)
from gpu_scheduler.fgd import PodShape


def node(
    name: str,
    gpus: int = 4,
    *,
    busy: int = 0,
    cpu_free: int = -1,
    state: NodeState = NodeState.UP,
    images: tuple[str, ...] = (),
    datasets: dict[str, int] | None = None,
) -> NodeSnapshot:
    """A node with *gpus* A100s, the first *busy* of them taken."""
    return NodeSnapshot(
        name=name,
        cpu_total_milli=16_000,
        memory_total_mib=65_536,
        cpu_free_milli=cpu_free,
        gpus=tuple(
            GpuSnapshot(index=i, model="A100", free_milli=0 if i < busy else 1000)
            for i in range(gpus)
        ),
        state=state,
        images=frozenset(images),
        datasets=datasets or {},
    )


def mix() -> object:
    recent = RecentMix(window=100)
    for _ in range(10):
        recent.observe(PodShape.of(PlacementRequest.gpus(1, cpu_milli=1000)))
    return recent.typical()


@dataclass(frozen=True)
class Case:
    name: str
    nodes: tuple[NodeSnapshot, ...]
    request: PlacementRequest
    chosen: str
    note: str | None = None  # a fragment of the placement's note (None: no note)


def ask(gpus: float = 1, home: str | None = "node-b", **kw: object) -> PlacementRequest:
    return PlacementRequest.gpus(gpus, cpu_milli=1000, memory_mib=2048, home_node=home, **kw)


CASES = [
    Case(
        "the home node wins over the node listed first",
        (node("node-a"), node("node-b")),
        ask(),
        "node-b",
    ),
    Case(
        "the home node wins over better packing elsewhere (a nearly full node)",
        (node("node-a", busy=3), node("node-b")),
        ask(),
        "node-b",
    ),
    Case(
        "the home node wins over a cached dataset and a present image elsewhere",
        (
            node("node-a", images=("img",), datasets={"mnist@1": 10**9}),
            node("node-b"),
        ),
        ask(datasets=(), image="img"),
        "node-b",
    ),
    Case(
        "a CPU-only server goes home too",
        (node("node-a"), node("node-b")),
        ask(gpus=0),
        "node-b",
    ),
    Case(
        "a full home node: placed elsewhere, saying why",
        (node("node-a"), node("node-b", busy=4)),
        ask(),
        "node-a",
        "not on node-b, which holds the home folder: Insufficient gpu: requested 1, free 0",
    ),
    Case(
        "a draining home node: placed elsewhere, saying so",
        (node("node-a"), node("node-b", state=NodeState.DRAINING)),
        ask(),
        "node-a",
        "not on node-b, which holds the home folder: node-b is draining",
    ),
    Case(
        "a home node without enough CPU: the CPU reason",
        (node("node-a"), node("node-b", cpu_free=500)),
        ask(),
        "node-a",
        "Insufficient cpu",
    ),
    Case(
        "a home node that left the cluster: said plainly",
        (node("node-a"), node("node-c")),
        ask(),
        "node-a",
        "not on node-b, which holds the home folder: node-b is not a node of this cluster",
    ),
    Case(
        "no home node: no preference and no note",
        (node("node-a"), node("node-b")),
        ask(home=None),
        "node-a",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_server_is_placed_on_its_home_node_or_says_why_not(case: Case) -> None:
    result = place(ClusterSnapshot(case.nodes), case.request, mix=mix())  # type: ignore[arg-type]
    assert result.placement is not None, result.message
    assert result.placement.node == case.chosen
    if case.note is None:
        assert result.placement.note is None
    else:
        assert result.placement.note is not None and case.note in result.placement.note


def test_the_home_part_of_the_score_is_reported() -> None:
    result = place(ClusterSnapshot((node("node-a"), node("node-b"))), ask(), mix=mix())  # type: ignore[arg-type]
    assert result.placement is not None
    assert result.placement.score_parts["home"] == 200.0


def test_a_zero_home_weight_ignores_homes_and_says_another_node_scored_higher() -> None:
    weights = Weights(home=0.0)
    result = place(ClusterSnapshot((node("node-a"), node("node-b"))), ask(), weights=weights)
    assert result.placement is not None and result.placement.node == "node-a"
    assert "home" not in result.placement.score_parts
    assert result.placement.note == (
        "not on node-b, which holds the home folder: node-a scored higher "
        "(PlacementPolicy.home_weight)"
    )


def test_the_home_weight_is_a_documented_knob_refused_when_negative() -> None:
    from traitlets import TraitError

    policy = PlacementPolicy()
    assert policy.weights().home == 200.0
    assert "home folder" in PlacementPolicy.class_traits()["home_weight"].help
    with pytest.raises(TraitError, match=r"home_weight=-1\.0 must be a finite number >= 0"):
        policy.home_weight = -1
