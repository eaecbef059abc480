"""The queue step: which waiting jobs start now, and why the others wait.

Pure: :func:`schedule` takes the waiting jobs, a cluster snapshot, each user's running usage
and limits, and an admission hook, and returns a :class:`QueuePlan`. No clock, no I/O.

Rules, in order:

- **Order.** Higher ``priority`` first; first come, first served within a level (``seq``).
- **Admission.** The ``admit`` hook (e.g. a credit check) may hold a job back with a reason;
  a held job does not block the queue.
- **Per-user limits.** A job that would take its user past ``max_gpus`` or ``max_jobs``
  waits; it does not block other users.
- **Can never fit.** A job no node could ever take is reported ``infeasible`` and skipped.
- **Reservation and backfill.** The first eligible job that does not fit now is the *head*:
  the node where it is closest to fitting is reserved for it. Later jobs may start
  (*backfill*) only on other nodes, so they never take what the head is waiting for. With
  ``backfill=False`` everything behind the head waits (strict order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .fgd import TypicalMix
from .model import (
    GPU_MILLI,
    ClusterSnapshot,
    Code,
    NodeSnapshot,
    NodeState,
    Placement,
    PlacementRequest,
    Reason,
)
from .policy import DEFAULT_WEIGHTS, Strategy, Weights, node_reasons, place


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A request waiting in the queue.

    Attributes:
        id: stable identity, e.g. ``"kim/mnist/12"``.
        user: owner; per-user limits apply to it.
        request: the resources asked for.
        priority: higher runs first; any integer (e.g. 0 normal, 10 urgent, -10 batch).
        seq: submission order (smaller first) inside a priority level.
    """

    id: str
    user: str
    request: PlacementRequest
    priority: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class UserUsage:
    """What a user holds now: milli-GPU and the number of running jobs."""

    gpu_milli: int = 0
    jobs: int = 0


@dataclass(frozen=True, slots=True)
class UserLimits:
    """Per-user caps; ``None`` means no cap.

    Attributes:
        max_gpus: GPUs a user may hold at once (fractions count as their share).
        max_jobs: jobs a user may run at once.
    """

    max_gpus: float | None = None
    max_jobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_gpus is not None and self.max_gpus < 0:
            raise ValueError(f"max_gpus={self.max_gpus} must be >= 0 or None (no cap)")
        if self.max_jobs is not None and self.max_jobs < 0:
            raise ValueError(f"max_jobs={self.max_jobs} must be >= 0 or None (no cap)")


NO_LIMITS = UserLimits()

AdmissionHook = Callable[[QueuedJob], str | None]
"""Returns ``None`` to admit the job, or the reason it must wait (shown to the user)."""


@dataclass(frozen=True, slots=True)
class Start:
    """A job to start now, and where."""

    job: QueuedJob
    placement: Placement
    backfilled: bool = False


@dataclass(frozen=True, slots=True)
class Waiting:
    """A job that keeps waiting.

    Attributes:
        job: the job.
        position: 1-based place among the waiting jobs in queue order (1 = next).
        reason: one sentence for the user.
        kind: ``resources``, ``reserved``, ``blocked``, ``user-limit``, ``admission`` or
            ``infeasible``.
        code: the placement code when the policy was asked (``unschedulable``/``infeasible``).
        reasons: the per-node reasons behind ``reason``, when the policy gave them.
    """

    job: QueuedJob
    position: int
    reason: str
    kind: str
    code: Code | None = None
    reasons: Sequence[Reason] = ()


@dataclass(frozen=True, slots=True)
class Reservation:
    """The node held for the head job, and what it is short of."""

    job: QueuedJob
    node: str
    shortfall: tuple[Reason, ...]


@dataclass(frozen=True)
class QueuePlan:
    """Result of one queue step."""

    starts: tuple[Start, ...]
    waiting: tuple[Waiting, ...]
    reservation: Reservation | None
    snapshot: ClusterSnapshot = field(repr=False)

    def position(self, job_id: str) -> int | None:
        """The waiting position of ``job_id`` (``None`` if it starts or is unknown)."""
        for w in self.waiting:
            if w.job.id == job_id:
                return w.position
        return None


def queue_order(jobs: Sequence[QueuedJob]) -> list[QueuedJob]:
    """Jobs in the order the queue considers them: priority desc, then ``seq``, then id."""
    return sorted(jobs, key=lambda j: (-j.priority, j.seq, j.id))


def _over_limit(job: QueuedJob, usage: UserUsage, limits: UserLimits) -> str | None:
    if limits.max_jobs is not None and usage.jobs + 1 > limits.max_jobs:
        return (
            f"user {job.user} has {usage.jobs} running job(s), the limit is {limits.max_jobs}; "
            "it starts when one of them ends"
        )
    if limits.max_gpus is not None and job.request.gpu_milli:
        cap = round(limits.max_gpus * GPU_MILLI)
        if usage.gpu_milli + job.request.gpu_milli > cap:
            return (
                f"user {job.user} holds {usage.gpu_milli / GPU_MILLI:g} GPU(s) and asks for "
                f"{job.request.gpu_milli / GPU_MILLI:g} more, the limit is "
                f"{limits.max_gpus:g}; it starts when some are released"
            )
    return None


def _shortfall_key(node: NodeSnapshot, request: PlacementRequest) -> tuple[float, ...] | None:
    """How far ``node`` is from fitting ``request`` now (``None``: never, or not up)."""
    if node.state is not NodeState.UP:
        return None
    rs = node_reasons(node, request)
    if any(r.permanent for r in rs):
        return None
    gpu_short = 0.0
    k = request.num_gpus
    if k:
        allowed = [
            g
            for g in node.gpus
            if g.healthy and (not request.gpu_models or g.model in request.gpu_models)
        ]
        if request.is_fractional:
            gpu_short = max(0, request.gpu_milli - max(g.free_milli for g in allowed))
        else:
            free = sum(1 for g in allowed if g.free_milli >= GPU_MILLI)
            # whole GPUs missing, then how busy the partly used ones are
            partly = sorted(GPU_MILLI - g.free_milli for g in allowed if g.free_milli < GPU_MILLI)
            gpu_short = max(0, k - free) * GPU_MILLI + sum(partly[: max(0, k - free)]) / 1e3
    cpu_short = max(0, request.cpu_milli - node.cpu_free_milli) / max(node.cpu_total_milli, 1)
    mem_short = max(0, request.memory_mib - node.memory_free_mib) / max(node.memory_total_mib, 1)
    return (gpu_short, cpu_short + mem_short)


def reserve_for(snapshot: ClusterSnapshot, job: QueuedJob) -> Reservation | None:
    """The up node closest to fitting ``job`` (first in snapshot order on ties), if any."""
    best: tuple[tuple[float, ...], int] | None = None
    for i, nd in enumerate(snapshot.nodes):
        key = _shortfall_key(nd, job.request)
        if key is not None and (best is None or key < best[0]):
            best = (key, i)
    if best is None:
        return None
    nd = snapshot.nodes[best[1]]
    return Reservation(job, nd.name, tuple(node_reasons(nd, job.request)))


def schedule(
    jobs: Sequence[QueuedJob],
    snapshot: ClusterSnapshot,
    *,
    usage: Mapping[str, UserUsage] | None = None,
    limits: Mapping[str, UserLimits] | None = None,
    default_limits: UserLimits = NO_LIMITS,
    admit: AdmissionHook | None = None,
    mix: TypicalMix | None = None,
    weights: Weights = DEFAULT_WEIGHTS,
    strategy: Strategy = Strategy.NSML,
    backfill: bool = True,
) -> QueuePlan:
    """One queue step: start what can start now without delaying the head job.

    Args:
        jobs: waiting jobs, any order.
        snapshot: the cluster now (free resources already net of running jobs).
        usage: each user's running usage (missing users hold nothing).
        limits: per-user limits; users not listed get ``default_limits``.
        admit: admission hook, e.g. a credit check.
        mix, weights, strategy: passed to :func:`gpu_scheduler.policy.place`.
        backfill: let later jobs start around the head's reservation.

    Returns:
        The jobs to start with their placements, the waiting jobs with position and reason,
        the head's reservation, and the snapshot after the starts.
    """
    used: dict[str, UserUsage] = dict(usage or {})
    limit_of = dict(limits or {})
    starts: list[Start] = []
    pending: list[tuple[QueuedJob, str, str, Code | None, Sequence[Reason]]] = []
    reservation: Reservation | None = None
    held = snapshot  # the snapshot backfill jobs see: the reserved node is withheld

    for job in queue_order(jobs):
        if admit is not None:
            why = admit(job)
            if why is not None:
                pending.append((job, why, "admission", None, ()))
                continue
        u = used.get(job.user, UserUsage())
        why = _over_limit(job, u, limit_of.get(job.user, default_limits))
        if why is not None:
            pending.append((job, why, "user-limit", None, ()))
            continue
        if reservation is not None and not backfill:
            pending.append(
                (job, f"waits behind {reservation.job.id} (strict order)", "blocked", None, ())
            )
            continue
        result = place(held, job.request, mix=mix, weights=weights, strategy=strategy)
        if result.placement is not None:
            p = result.placement
            if held is snapshot:
                snapshot = held = snapshot.assume(p)
            else:
                snapshot, held = snapshot.assume(p), held.assume(p)
            used[job.user] = UserUsage(u.gpu_milli + p.gpu_milli, u.jobs + 1)
            starts.append(Start(job, p, backfilled=reservation is not None))
            continue
        full = place(snapshot, job.request, mix=mix, weights=weights, strategy=strategy)
        if full.code is Code.INFEASIBLE:
            pending.append(
                (job, f"can never fit: {full.message}", "infeasible", full.code, full.reasons)
            )
            continue
        if reservation is None:
            reservation = reserve_for(snapshot, job)
            if reservation is not None:
                nd = snapshot.node(reservation.node)
                held = snapshot.with_node(replace(nd, state=NodeState.DRAINING))
                short = "; ".join(r.message for r in reservation.shortfall)
                pending.append(
                    (
                        job,
                        f"next in line; {nd.name} is reserved for it ({short})",
                        "reserved",
                        full.code,
                        full.reasons,
                    )
                )
            else:
                pending.append(
                    (
                        job,
                        f"waiting for resources: {full.message}",
                        "resources",
                        full.code,
                        full.reasons,
                    )
                )
            continue
        if full.placement is not None:
            pending.append(
                (
                    job,
                    f"fits only on {reservation.node}, which is reserved for "
                    f"{reservation.job.id}; backfill may not delay it",
                    "blocked",
                    Code.UNSCHEDULABLE,
                    (),
                )
            )
            continue
        pending.append(
            (job, f"waiting for resources: {full.message}", "resources", full.code, full.reasons)
        )

    waiting = tuple(
        Waiting(job, pos, reason, kind, code, reasons)
        for pos, (job, reason, kind, code, reasons) in enumerate(pending, start=1)
    )
    return QueuePlan(tuple(starts), waiting, reservation, snapshot)
