"""The queue step, as a specification: order, backfill, limits, admission, positions."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gpu_scheduler import (
    ClusterSnapshot,
    Code,
    GpuSnapshot,
    NodeSnapshot,
    PlacementRequest,
    QueuedJob,
    UserLimits,
    UserUsage,
    queue_order,
    schedule,
)


def node(name: str, gpus: int, free: Sequence[int] | None = None) -> NodeSnapshot:
    shares = list(free) if free is not None else [1000] * gpus
    return NodeSnapshot(
        name=name,
        cpu_total_milli=64_000,
        memory_total_mib=256_000,
        gpus=tuple(GpuSnapshot(index=i, model="A100", free_milli=f) for i, f in enumerate(shares)),
    )


def job(
    id: str, gpus: float, *, user: str = "kim", priority: int = 0, seq: int | None = None
) -> QueuedJob:
    return QueuedJob(
        id=id,
        user=user,
        request=PlacementRequest.gpus(gpus, cpu_milli=1000, memory_mib=1024),
        priority=priority,
        seq=seq if seq is not None else int(id.rsplit("/", 1)[-1]),
    )


def started(plan: object) -> list[str]:
    return [s.job.id for s in plan.starts]  # type: ignore[attr-defined]


def waiting(plan: object) -> list[tuple[int, str, str]]:
    return [(w.position, w.job.id, w.kind) for w in plan.waiting]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("jobs", "order"),
    [
        pytest.param(
            [job("u/d/2", 1), job("u/d/1", 1), job("u/d/3", 1)],
            ["u/d/1", "u/d/2", "u/d/3"],
            id="FIFO within a priority level",
        ),
        pytest.param(
            [job("u/d/1", 1), job("u/d/2", 1, priority=10), job("u/d/3", 1, priority=-5)],
            ["u/d/2", "u/d/1", "u/d/3"],
            id="higher priority first",
        ),
    ],
)
def test_queue_order(jobs: list[QueuedJob], order: list[str]) -> None:
    assert [j.id for j in queue_order(jobs)] == order


def test_jobs_start_in_order_until_the_cluster_is_full() -> None:
    snap = ClusterSnapshot([node("a", 4)])
    plan = schedule([job("u/d/1", 2), job("u/d/2", 2), job("u/d/3", 2)], snap)
    assert started(plan) == ["u/d/1", "u/d/2"]
    assert waiting(plan) == [(1, "u/d/3", "reserved")]
    assert plan.snapshot.node("a").gpu_free_milli == 0


def test_backfill_never_delays_the_head() -> None:
    """The head needs 4 GPUs: node-a (2 free) is reserved; small jobs go to node-b only."""
    snap = ClusterSnapshot(
        [node("node-a", 8, [1000, 1000] + [0] * 6), node("node-b", 2, [1000, 0])]
    )
    jobs = [job("u/head/1", 4), job("u/small/2", 1), job("u/pair/3", 2), job("u/small/4", 1)]
    plan = schedule(jobs, snap)
    assert plan.reservation is not None and plan.reservation.node == "node-a"
    assert plan.reservation.job.id == "u/head/1"
    assert started(plan) == ["u/small/2"]
    assert [s.placement.node for s in plan.starts] == ["node-b"]
    assert plan.starts[0].backfilled
    assert waiting(plan) == [
        (1, "u/head/1", "reserved"),
        (2, "u/pair/3", "blocked"),
        (3, "u/small/4", "blocked"),
    ]
    assert plan.snapshot.node("node-a").gpu_free_milli == 2000  # untouched for the head
    assert "reserved for u/head/1" in plan.waiting[1].reason


def test_backfill_uses_other_nodes_freely() -> None:
    snap = ClusterSnapshot([node("node-a", 8, [1000] * 2 + [0] * 6), node("node-b", 8)])
    plan = schedule([job("u/d/1", 8, priority=5), job("u/d/2", 1), job("u/d/3", 2)], snap)
    assert started(plan) == ["u/d/1", "u/d/2"]
    assert plan.reservation is not None and plan.reservation.job.id == "u/d/3"


def test_strict_order_without_backfill() -> None:
    snap = ClusterSnapshot([node("node-a", 8, [1000, 1000] + [0] * 6), node("node-b", 2)])
    plan = schedule([job("u/d/1", 4), job("u/d/2", 1)], snap, backfill=False)
    assert started(plan) == []
    assert waiting(plan) == [(1, "u/d/1", "reserved"), (2, "u/d/2", "blocked")]
    assert "strict order" in plan.waiting[1].reason


@pytest.mark.parametrize(
    ("limits", "usage", "expect_start"),
    [
        pytest.param(
            UserLimits(max_gpus=2),
            UserUsage(gpu_milli=1000, jobs=1),
            ["u/d/1"],
            id="per-user GPU limit: 1 held + 1 asked fits, then 1 more does not",
        ),
        pytest.param(
            UserLimits(max_jobs=1),
            UserUsage(gpu_milli=0, jobs=1),
            [],
            id="per-user job limit reached",
        ),
        pytest.param(
            UserLimits(max_gpus=0.5), UserUsage(), [], id="fractions count against the GPU limit"
        ),
        pytest.param(
            UserLimits(), UserUsage(gpu_milli=64_000, jobs=99), ["u/d/1", "u/d/2"], id="no limits"
        ),
    ],
)
def test_per_user_limits(limits: UserLimits, usage: UserUsage, expect_start: list[str]) -> None:
    snap = ClusterSnapshot([node("a", 8)])
    jobs = [job("u/d/1", 1, user="kim"), job("u/d/2", 1, user="kim")]
    plan = schedule(jobs, snap, usage={"kim": usage}, limits={"kim": limits})
    assert started(plan) == expect_start
    for w in plan.waiting:
        assert w.kind == "user-limit"
        assert "user kim" in w.reason and "limit" in w.reason


def test_a_user_at_the_limit_does_not_block_others() -> None:
    snap = ClusterSnapshot([node("a", 8)])
    jobs = [job("u/d/1", 1, user="kim"), job("u/d/2", 1, user="lee")]
    plan = schedule(
        jobs, snap, usage={"kim": UserUsage(jobs=3)}, default_limits=UserLimits(max_jobs=3)
    )
    assert started(plan) == ["u/d/2"]
    assert waiting(plan) == [(1, "u/d/1", "user-limit")]


def test_admission_hook_holds_jobs_with_its_reason() -> None:
    def credits(j: QueuedJob) -> str | None:
        return "no credits left: balance 0, this job needs 1 GPU-hour" if j.user == "kim" else None

    snap = ClusterSnapshot([node("a", 8)])
    plan = schedule([job("u/d/1", 1, user="kim"), job("u/d/2", 1, user="lee")], snap, admit=credits)
    assert started(plan) == ["u/d/2"]
    assert plan.waiting[0].kind == "admission"
    assert plan.waiting[0].reason.startswith("no credits left")


def test_a_job_that_can_never_fit_is_reported_and_skipped() -> None:
    snap = ClusterSnapshot([node("a", 8)])
    plan = schedule([job("u/d/1", 16), job("u/d/2", 1)], snap)
    assert started(plan) == ["u/d/2"]
    assert plan.reservation is None
    (w,) = plan.waiting
    assert (w.kind, w.code) == ("infeasible", Code.INFEASIBLE)
    assert "can never fit" in w.reason
    assert [str(r) for r in w.reasons] == ["Insufficient gpu: requested 16, a has 8 in total"]


def test_waiting_jobs_report_position_and_reason() -> None:
    snap = ClusterSnapshot([node("a", 2, [0, 0])])
    plan = schedule([job("u/d/1", 1), job("u/d/2", 1), job("u/d/3", 1)], snap)
    assert [w.position for w in plan.waiting] == [1, 2, 3]
    assert plan.position("u/d/3") == 3
    assert plan.position("missing") is None
    assert "Insufficient gpu: requested 1, free 0 on a" in plan.waiting[0].reason
    assert plan.waiting[1].reason.startswith("fits only on") is False
    assert "waiting for resources" in plan.waiting[1].reason


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_gpus=-1 must be >= 0"):
        UserLimits(max_gpus=-1)
