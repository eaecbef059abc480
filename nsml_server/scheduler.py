"""The scheduler loop: the leader turns waiting placement requests into allocations.

Every server accepts requests (a row in ``placement_requests``) and answers questions about
them; only the server holding the scheduler lease decides. One *pass* reads the waiting
requests and a snapshot of the cluster, asks the pure queue step
(:func:`gpu_scheduler.queue.schedule`) what starts now, and writes the allocations and every
waiting request's position and reason, all in one transaction fenced by the lease. The ledger's
conditional updates make a double allocation impossible even if two passes ever overlapped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from gpu_scheduler.fgd import PodShape, RecentMix
from gpu_scheduler.model import (
    ClusterSnapshot,
    DatasetRef,
    GpuSnapshot,
    NodeSnapshot,
    NodeState,
    PlacementRequest,
)
from gpu_scheduler.policy import PlacementPolicy, Strategy
from gpu_scheduler.queue import QueuedJob, UserLimits, UserUsage, schedule

from . import ledger
from .db import Database
from .lease import LeaderLease, LostLease
from .models import Allocation, Node, PlacementRequestRow

log = logging.getLogger("nsml_server.scheduler")

# Request states: waiting -> placed -> released; waiting -> failed (can never fit) | cancelled.
FINAL_STATES = ("placed", "released", "failed", "cancelled")


def request_of(spec: dict[str, Any], name: str = "") -> PlacementRequest:
    """The policy's request from a stored spec (units: milli-GPU, milli-CPU, MiB)."""
    return PlacementRequest(
        name=name,
        gpu_milli=int(spec.get("gpu_milli", 0)),
        gpu_models=frozenset(spec.get("gpu_models") or ()),
        cpu_milli=int(spec.get("cpu_milli", 0)),
        memory_mib=int(spec.get("memory_mib", 0)),
        datasets=tuple(
            DatasetRef.parse(str(d["ref"]), int(d.get("bytes", 0)))
            for d in spec.get("datasets") or ()
        ),
        image=spec.get("image"),
    )


def build_snapshot(s: Session) -> ClusterSnapshot:
    """The cluster as the ledger sees it now, nodes in name order (stable tie-breaking)."""
    nodes = s.scalars(select(Node).options(selectinload(Node.gpus)).order_by(Node.name))
    out = []
    for n in nodes:
        gpus = tuple(
            GpuSnapshot(
                index=g.index,
                model=g.model,
                uuid=g.uuid,
                memory_total_mib=g.memory_total_mib,
                free_milli=max(0, 1000 - g.allocated_milli) if g.healthy else 0,
                nvlink_peers=frozenset(g.nvlink_peers),
                pcie_group=None if g.pcie_group is None else str(g.pcie_group),
                healthy=g.healthy,
            )
            for g in n.gpus
        )
        out.append(
            NodeSnapshot(
                name=n.name,
                cpu_total_milli=n.cpu_milli,
                memory_total_mib=n.memory_mib,
                gpus=gpus,
                cpu_free_milli=max(0, n.cpu_milli - n.cpu_allocated_milli),
                memory_free_mib=max(0, n.memory_mib - n.memory_allocated_mib),
                state=NodeState(n.state),
                images=frozenset(n.images),
            )
        )
    return ClusterSnapshot(out)


def user_usage(s: Session) -> dict[str, UserUsage]:
    """What each user's active allocations hold (milli-GPU and count)."""
    usage: dict[str, UserUsage] = {}
    rows = s.execute(
        select(Allocation.user_name, Allocation.gpu_milli_per_gpu, Allocation.gpu_indices).where(
            Allocation.state == "active"
        )
    )
    for name, per_gpu, indices in rows:
        u = usage.get(name, UserUsage())
        usage[name] = UserUsage(u.gpu_milli + per_gpu * len(indices), u.jobs + 1)
    return usage


def detail(reasons: tuple[Any, ...], most: int = 5) -> str:
    """Per-node reasons as a tail for a summary: `` Insufficient gpu: ... on node-a; ...``."""
    if not reasons:
        return ""
    shown = "; ".join(str(r) for r in reasons[:most])
    more = f"; and {len(reasons) - most} more" if len(reasons) > most else ""
    return f" ({shown}{more})"


@dataclass
class PassResult:
    placed: int = 0
    waiting: int = 0
    failed: int = 0


class Scheduler:
    """Submits requests (any server) and runs the scheduler loop (the lease holder)."""

    def __init__(
        self,
        db: Database,
        lease: LeaderLease,
        policy: PlacementPolicy,
        *,
        now: Callable[[], datetime],
        default_limits: UserLimits | None = None,
        admit: Callable[[QueuedJob], str | None] | None = None,
        backfill: bool = True,
        renew_interval_s: float = 1.0,
        idle_poll_s: float = 0.25,
    ) -> None:
        self.db = db
        self.lease = lease
        self.policy = policy
        self.now = now
        self.default_limits = default_limits or UserLimits()
        self.admit = admit
        self.backfill = backfill
        self.renew_interval_s = renew_interval_s
        self.idle_poll_s = idle_poll_s
        self.mix: RecentMix = policy.recent_mix()
        self._seen_id = 0
        self._wake: asyncio.Event | None = None
        self._decided: asyncio.Condition | None = None

    # ---- any server ---------------------------------------------------------------------

    def submit(
        self, s: Session, *, user: str, holder: str, spec: dict[str, Any], priority: int
    ) -> PlacementRequestRow:
        """Queue a request in the caller's transaction; idempotent per holder.

        A holder with an active allocation or a waiting request gets that one back.
        """
        existing = s.scalar(
            select(PlacementRequestRow)
            .where(
                PlacementRequestRow.holder == holder,
                PlacementRequestRow.state.in_(("waiting", "placed")),
            )
            .order_by(PlacementRequestRow.id.desc())
        )
        if existing is not None:
            if existing.state == "waiting":
                return existing
            alloc = s.get(Allocation, existing.allocation_id) if existing.allocation_id else None
            if alloc is not None and alloc.state == "active":
                return existing
        row = PlacementRequestRow(
            holder=holder,
            user_name=user,
            priority=priority,
            spec=spec,
            state="waiting",
            created=self.now(),
        )
        s.add(row)
        s.flush()
        self.wake()
        return row

    def release(self, s: Session, row: PlacementRequestRow) -> bool:
        """Cancel a waiting request or release a placed one. Idempotent."""
        if row.state == "waiting":
            row.state = "cancelled"
            row.decided = self.now()
            self.wake()
            return True
        if row.state == "placed" and row.allocation_id is not None:
            released = ledger.release(s, row.allocation_id, self.now())
            row.state = "released"
            self.wake()
            return released
        return False

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def wait_decided(self, request_id: int, timeout_s: float) -> None:
        """Return when the request left ``waiting`` or *timeout_s* passed (whichever first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            with self.db.session() as s:
                state = s.scalar(
                    select(PlacementRequestRow.state).where(PlacementRequestRow.id == request_id)
                )
            if state != "waiting":
                return
            left = deadline - loop.time()
            if left <= 0:
                return
            if self.lease.is_leader and self._decided is not None:
                async with self._decided:
                    try:
                        await asyncio.wait_for(self._decided.wait(), min(left, 1.0))
                    except TimeoutError:
                        pass
            else:
                await asyncio.sleep(min(left, 0.1))

    # ---- the leader ---------------------------------------------------------------------

    def run_pass(self) -> PassResult:
        """One scheduling pass (blocking; call in the loop only while leading)."""
        result = PassResult()
        with self.db.session() as s:
            epoch = self.lease.fence(s)
            rows = list(
                s.scalars(
                    select(PlacementRequestRow)
                    .where(PlacementRequestRow.state == "waiting")
                    .order_by(PlacementRequestRow.id)
                )
            )
            if not rows:
                return result
            by_id = {str(r.id): r for r in rows}
            jobs = []
            for r in rows:
                req = request_of(r.spec, name=r.holder)
                if r.id > self._seen_id:
                    self.mix.observe(PodShape.of(req))
                jobs.append(QueuedJob(str(r.id), r.user_name, req, r.priority, r.id))
            self._seen_id = max(self._seen_id, rows[-1].id)
            plan = schedule(
                jobs,
                build_snapshot(s),
                usage=user_usage(s),
                default_limits=self.default_limits,
                admit=self.admit,
                mix=self.mix.typical(),
                weights=self.policy.weights(),
                strategy=Strategy(self.policy.strategy),
                backfill=self.backfill,
            )
            now = self.now()
            for start in plan.starts:
                row = by_id[start.job.id]
                p = start.placement
                try:
                    with s.begin_nested():
                        alloc = ledger.reserve(
                            s,
                            holder=row.holder,
                            user_name=row.user_name,
                            node_name=p.node,
                            gpu_indices=p.gpu_indices,
                            gpu_uuids=p.gpu_uuids,
                            gpu_milli_per_gpu=p.gpu_milli_per_gpu,
                            cpu_milli=p.cpu_milli,
                            memory_mib=p.memory_mib,
                            now=now,
                            leader_epoch=epoch,
                            score={"total": p.score, **p.score_parts},
                        )
                except ledger.Conflict as e:
                    log.warning(
                        "%s: placement on %s lost a race (%s); retrying", row.holder, p.node, e
                    )
                    row.message = f"retrying: {e}"
                    continue
                row.state = "placed"
                row.allocation_id = alloc.id
                row.code = "placed"
                row.message = f"placed on {p.node}" + (" (backfilled)" if start.backfilled else "")
                row.position = None
                row.decided = now
                result.placed += 1
            for w in plan.waiting:
                row = by_id[w.job.id]
                if w.kind == "infeasible":
                    row.state = "failed"
                    row.decided = now
                    result.failed += 1
                    log.info("%s can never fit: %s", row.holder, w.reason)
                else:
                    result.waiting += 1
                row.code = w.code.value if w.code is not None else w.kind
                row.message = w.reason + detail(w.reasons)
                row.position = w.position if row.state == "waiting" else None
        return result

    async def run(self, stop: asyncio.Event) -> None:
        """The loop: keep the lease, and while leading, run a pass whenever woken."""
        self._wake = asyncio.Event()
        self._decided = asyncio.Condition()
        loop = asyncio.get_running_loop()
        next_tick = 0.0
        while not stop.is_set():
            try:
                if loop.time() >= next_tick:
                    await loop.run_in_executor(None, self.lease.tick)
                    next_tick = loop.time() + self.renew_interval_s
                if self.lease.is_leader:
                    self._wake.clear()
                    res = await loop.run_in_executor(None, self.run_pass)
                    if res.placed or res.failed:
                        async with self._decided:
                            self._decided.notify_all()
            except LostLease as e:
                log.warning("%s", e)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler pass failed; retrying")
            timeout = self.idle_poll_s if self.lease.is_leader else self.renew_interval_s
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
        await loop.run_in_executor(None, self.lease.resign)
