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
import json
import logging
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, String, bindparam, cast, insert, select, update
from sqlalchemy.orm import Session

from gpu_scheduler.fgd import PodShape, RecentMix
from gpu_scheduler.model import (
    ClusterSnapshot,
    DatasetRef,
    GpuSnapshot,
    NodeSnapshot,
    NodeState,
    PlacementRequest,
    Reason,
)
from gpu_scheduler.policy import PlacementPolicy, Strategy
from gpu_scheduler.queue import QueuedJob, UserLimits, UserUsage, schedule

from . import ledger
from .db import Database
from .lease import LeaderLease, LostLease
from .models import Allocation, Gpu, Node, PlacementRequestRow

log = logging.getLogger("nsml_server.scheduler")

# Request states: waiting -> placed -> released; waiting -> failed (can never fit) | cancelled.


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
        home_node=spec.get("home_node") or None,
    )


class SnapshotCache:
    """Builds the cluster snapshot from the ledger, reusing unchanged nodes between passes.

    Two plain queries per pass (nodes, GPUs); a node whose row values did not change keeps its
    :class:`NodeSnapshot` (and its rows of the policy's numpy layout). The JSON columns are
    read as their text and compared as such; only a node that changed has them parsed (with
    1,000 nodes, parsing every GPU's peers and every node's images and datasets on each pass
    cost more than the rest of the pass).
    """

    def __init__(self) -> None:
        self.snapshot: ClusterSnapshot | None = None
        self.keys: dict[str, tuple[Any, ...]] = {}
        self.node_ids: dict[str, int] = {}

    def build(self, s: Session) -> ClusterSnapshot:
        conn = s.connection()  # plain rows: no ORM loading for ~10 rows per node
        node_rows = conn.execute(
            select(
                Node.id,
                Node.name,
                Node.cpu_milli,
                Node.memory_mib,
                Node.cpu_allocated_milli,
                Node.memory_allocated_mib,
                Node.state,
                cast(Node.images, String),
                Node.backend,
                Node.docker_url,
                cast(Node.datasets, String),
                Node.needs_sweep,
            ).order_by(Node.name)
        ).all()
        gpus_of: dict[int, list[tuple[Any, ...]]] = {}
        for row in conn.execute(
            select(
                Gpu.node_id,
                Gpu.index,
                Gpu.model,
                Gpu.uuid,
                Gpu.memory_total_mib,
                Gpu.allocated_milli,
                cast(Gpu.nvlink_peers, String),
                Gpu.pcie_group,
                Gpu.healthy,
            ).order_by(Gpu.node_id, Gpu.index)
        ).all():
            gpus_of.setdefault(row[0], []).append(tuple(row[1:]))
        names = [r[1] for r in node_rows]
        self.node_ids = {r[1]: r[0] for r in node_rows}
        snap = self.snapshot
        if snap is None or [n.name for n in snap.nodes] != names:
            snap = None
        keys: dict[str, tuple[Any, ...]] = {}
        fresh: list[NodeSnapshot] = []
        for r in node_rows:
            gpus = gpus_of.get(r[0], [])
            key = (
                *r[2:7],
                r[7],
                tuple(gpus),
                r[10],
                bool(r[11]),
            )
            keys[r[1]] = key
            if snap is not None and self.keys.get(r[1]) == key:
                continue
            node = _node_snapshot(r, gpus)
            if snap is not None:
                snap = snap.with_node(node)
            else:
                fresh.append(node)
        if snap is None:
            snap = ClusterSnapshot(fresh)
        self.snapshot, self.keys = snap, keys
        return snap


def _json(text: str | None) -> Any:
    """A JSON column read as text (``CAST(... AS VARCHAR)``), parsed; None for NULL."""
    return json.loads(text) if text else None


def _node_snapshot(r: Any, gpus: list[tuple[Any, ...]]) -> NodeSnapshot:
    return NodeSnapshot(
        name=r[1],
        cpu_total_milli=r[2],
        memory_total_mib=r[3],
        gpus=tuple(
            GpuSnapshot(
                index=index,
                model=model,
                uuid=uuid,
                memory_total_mib=mem,
                free_milli=max(0, 1000 - allocated) if healthy else 0,
                nvlink_peers=frozenset(_json(peers) or ()),
                pcie_group=None if pcie is None else str(pcie),
                healthy=bool(healthy),
            )
            for index, model, uuid, mem, allocated, peers, pcie, healthy in gpus
        ),
        cpu_free_milli=min(r[2], max(0, r[2] - r[4])),
        memory_free_mib=min(r[3], max(0, r[3] - r[5])),
        state=NodeState(r[6]) if reachable(r) else NodeState.DOWN,
        images=frozenset(_json(r[7]) or ()),
        datasets={str(k): int(v) for k, v in (_json(r[10]) or {}).items()},
    )


def reachable(r: Any) -> bool:
    """Whether work can be started on the node: a Docker node needs its engine's address
    (an agent started without --docker-url is listed, but receives nothing), and a node that
    was lost needs its orphan containers swept first (``needs_sweep``, see node_loss.py)."""
    return not (r[8] == "docker" and not r[9]) and not (len(r) > 11 and r[11])


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


def detail(reasons: Sequence[Reason], most: int = 5, said: str = "") -> str:
    """Per-node reasons as a tail for a summary: `` Insufficient gpu: ... on node-a; ...``.

    The nodes short of resources come first, then down or draining ones, and last those
    without an allowed GPU model (the ones a user can do least about). Reasons the summary
    *said* already are not repeated.
    """
    reasons = tuple(r for r in reasons if str(r) not in said)
    if not reasons:
        return ""
    rank = {"node-state": 1, "gpu-model": 2}
    reasons = tuple(sorted(reasons, key=lambda r: rank.get(r.resource, 0)))
    shown = "; ".join(str(r) for r in reasons[:most])
    more = f"; and {len(reasons) - most} more" if len(reasons) > most else ""
    return f" ({shown}{more})"


@dataclass
class PassResult:
    placed: int = 0
    waiting: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Submission:
    """One placement request to queue: who, for which holder, what, at which priority."""

    user: str
    holder: str
    spec: dict[str, Any]
    priority: int = 0


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
        gather_s: float = 0.005,
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
        self.gather_s = gather_s
        self.mix: RecentMix = policy.recent_mix()
        self._seen_id = 0
        self.snapshots = SnapshotCache()
        # Usage only matters to per-user limits; without limits the pass skips that query.
        self.limits_apply = (
            self.default_limits.max_gpus is not None or self.default_limits.max_jobs is not None
        )
        self.decisions: dict[int, dict[str, Any]] = {}
        self._wake: asyncio.Event | None = None
        self._decided: asyncio.Condition | None = None

    # ---- any server ---------------------------------------------------------------------

    def submit(
        self, s: Session, *, user: str, holder: str, spec: dict[str, Any], priority: int
    ) -> PlacementRequestRow:
        """Queue one request in the caller's transaction; idempotent per holder.

        A holder with an active allocation or a waiting request gets that one back.
        """
        rid, fresh, _created = self.submit_many(s, [Submission(user, holder, spec, priority)])[0]
        if fresh:
            self.wake()  # the pass runs after the caller's transaction commits (event loop)
        row = s.get(PlacementRequestRow, rid)
        assert row is not None
        return row

    def submit_many(self, s: Session, subs: list[Submission]) -> list[tuple[int, bool, datetime]]:
        """Queue several requests with one lookup and one multi-row INSERT.

        Returns ``(request id, fresh, created)`` per submission, in order. *fresh* is False
        when the holder already had a waiting request or an active allocation (that request
        is returned; it is also returned to a second submission of one holder in *subs*).
        Does not wake the scheduler loop: the caller does, once the transaction committed.
        """
        R = PlacementRequestRow
        live: dict[str, int] = {}
        for rid, holder, state, alloc_state in s.execute(
            select(R.id, R.holder, R.state, Allocation.state)
            .outerjoin(Allocation, Allocation.id == R.allocation_id)
            .where(R.holder.in_({x.holder for x in subs}), R.state.in_(("waiting", "placed")))
            .order_by(R.id)
        ):
            if state == "waiting" or alloc_state == "active":
                live[holder] = rid
            else:
                live.pop(holder, None)
        now = self.now()
        out: list[tuple[int, bool, datetime] | None] = [None] * len(subs)
        first_of: dict[str, int] = {}
        new: list[int] = []
        for i, x in enumerate(subs):
            if x.holder in live:
                out[i] = (live[x.holder], False, now)
            elif x.holder not in first_of:
                first_of[x.holder] = i
                new.append(i)
        if new:
            ids = s.scalars(
                insert(R).returning(R.id, sort_by_parameter_order=True),
                [
                    {
                        "holder": subs[i].holder,
                        "user_name": subs[i].user,
                        "priority": subs[i].priority,
                        "spec": subs[i].spec,
                        "state": "waiting",
                        "created": now,
                    }
                    for i in new
                ],
            ).all()
            for i, rid in zip(new, ids, strict=True):
                out[i] = (rid, True, now)
        for i, x in enumerate(subs):
            if out[i] is None:  # a repeat of a holder first submitted in this batch
                first = out[first_of[x.holder]]
                assert first is not None
                out[i] = (first[0], False, first[2])
        return [o for o in out if o is not None]

    def release(self, s: Session, row: PlacementRequestRow) -> bool:
        """Cancel a waiting request or release a placed one. Idempotent.

        *row* may be stale: a pass may have placed the request since it was read. Each change
        is therefore a compare-and-set on the request's state; when the cancel finds the
        request no longer waiting, the row is read again and its allocation released, so an
        allocation is never left held by a request marked cancelled.
        """
        R = PlacementRequestRow
        now = self.now()
        if row.state == "waiting":
            r = s.execute(
                update(R)
                .where(R.id == row.id, R.state == "waiting")
                .values(state="cancelled", decided=now)
                .execution_options(synchronize_session=False)
            )
            s.refresh(row)
            if typing.cast(CursorResult[Any], r).rowcount == 1:
                self.wake()
                return True
        if row.state == "placed" and row.allocation_id is not None:
            released = ledger.release(s, row.allocation_id, now)
            s.execute(
                update(R)
                .where(R.id == row.id, R.state == "placed")
                .values(state="released")
                .execution_options(synchronize_session=False)
            )
            s.refresh(row)
            self.wake()
            return released
        return False

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def wait_decided(self, request_id: int, timeout_s: float) -> dict[str, Any] | None:
        """Wait until the request left ``waiting`` or *timeout_s* passed.

        Returns the decision when this server made it (the leader remembers its recent
        decisions), else None: the caller reads the request from the database.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if request_id in self.decisions:
                return self.decisions[request_id]
            if not self.lease.is_leader or self._decided is None:
                with self.db.session() as s:
                    state = s.scalar(
                        select(PlacementRequestRow.state).where(
                            PlacementRequestRow.id == request_id
                        )
                    )
                if state != "waiting":
                    return None
            left = deadline - loop.time()
            if left <= 0:
                return None
            if self.lease.is_leader and self._decided is not None:
                async with self._decided:
                    try:
                        await asyncio.wait_for(self._decided.wait(), min(left, 0.5))
                    except TimeoutError:
                        pass
            else:
                await asyncio.sleep(min(left, 0.1))

    # ---- the leader ---------------------------------------------------------------------

    def run_pass(self) -> PassResult:
        """One scheduling pass (blocking; call in the loop only while leading).

        Reads the waiting requests and the ledger, runs the pure queue step, and writes every
        reservation and request update in a handful of batched statements, in one transaction
        fenced by the lease.
        """
        result = PassResult()
        R = PlacementRequestRow
        with self.db.session() as s:
            epoch = self.lease.fence(s)
            rows = s.execute(
                select(
                    R.id, R.holder, R.user_name, R.priority, R.spec, R.position, R.code, R.message
                )
                .where(R.state == "waiting")
                .order_by(R.id)
            ).all()
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
            snapshot = self.snapshots.build(s)
            plan = schedule(
                jobs,
                snapshot,
                usage=user_usage(s) if self.limits_apply else None,
                default_limits=self.default_limits,
                admit=self.admit,
                mix=self.mix.typical(),
                weights=self.policy.weights(),
                strategy=Strategy(self.policy.strategy),
                backfill=self.backfill,
            )
            now = self.now()
            grants = [
                ledger.Grant(
                    holder=by_id[st.job.id].holder,
                    user_name=by_id[st.job.id].user_name,
                    node_id=self.snapshots.node_ids[st.placement.node],
                    gpu_indices=st.placement.gpu_indices,
                    gpu_uuids=st.placement.gpu_uuids,
                    gpu_milli_per_gpu=st.placement.gpu_milli_per_gpu,
                    cpu_milli=st.placement.cpu_milli,
                    memory_mib=st.placement.memory_mib,
                    score={"total": st.placement.score, **st.placement.score_parts},
                )
                for st in plan.starts
            ]
            alloc_ids = self._reserve(s, grants, now, epoch)
            changes: list[dict[str, Any]] = []
            for st, aid in zip(plan.starts, alloc_ids, strict=True):
                row, p = by_id[st.job.id], st.placement
                if aid is None:
                    changes.append(
                        self._change(
                            row,
                            "waiting",
                            None,
                            row.position,
                            row.code,
                            "retrying: the resources were taken",
                            None,
                        )
                    )
                    continue
                msg = f"placed on {p.node}" + (" (backfilled)" if st.backfilled else "")
                if p.note:
                    msg += f"; {p.note}"
                changes.append(self._change(row, "placed", aid, None, "placed", msg, now))
                self._remember(row, "placed", aid, p.node, p, msg, now)
                result.placed += 1
            for w in plan.waiting:
                row = by_id[w.job.id]
                code = w.code.value if w.code is not None else w.kind
                msg = w.reason + detail(w.reasons, said=w.reason)
                if w.kind == "infeasible":
                    changes.append(self._change(row, "failed", None, None, code, msg, now))
                    self._remember(row, "failed", None, None, None, msg, now, code)
                    result.failed += 1
                    log.info("%s can never fit: %s", row.holder, msg)
                    continue
                result.waiting += 1
                if (row.position, row.code, row.message) != (w.position, code, msg):
                    changes.append(self._change(row, "waiting", None, w.position, code, msg, None))
            if changes:
                s.connection().execute(
                    update(R)
                    .where(R.id == bindparam("rid"), R.state == "waiting")
                    .values(
                        state=bindparam("st"),
                        allocation_id=bindparam("aid"),
                        position=bindparam("pos"),
                        code=bindparam("cd"),
                        message=bindparam("msg"),
                        decided=bindparam("dec"),
                    ),
                    changes,
                )
            result.placed -= self._release_unclaimed(s, changes, now)
        return result

    def _release_unclaimed(self, s: Session, changes: list[dict[str, Any]], now: datetime) -> int:
        """Release this pass's reservations whose request stopped waiting meanwhile.

        A request cancelled after the pass read it (PostgreSQL lets the cancel commit while
        the pass runs) keeps its new state: the update above skips it, and the allocation
        reserved for it would otherwise stay held with nobody to release it.
        """
        R = PlacementRequestRow
        reserved = {c["rid"]: c["aid"] for c in changes if c["st"] == "placed"}
        if not reserved:
            return 0
        claimed = s.execute(
            select(R.id, R.state, R.allocation_id).where(R.id.in_(list(reserved)))
        ).all()
        unclaimed = [
            r.id for r in claimed if (r.state, r.allocation_id) != ("placed", reserved[r.id])
        ]
        for rid in unclaimed:
            ledger.release(s, reserved[rid], now)
            self.decisions.pop(rid, None)
            log.info("request %s stopped waiting during the pass; its reservation is released", rid)
        return len(unclaimed)

    @staticmethod
    def _change(
        row: Any,
        state: str,
        aid: int | None,
        pos: int | None,
        code: str | None,
        msg: str | None,
        decided: datetime | None,
    ) -> dict[str, Any]:
        return {
            "rid": row.id,
            "st": state,
            "aid": aid,
            "pos": pos,
            "cd": code,
            "msg": msg,
            "dec": decided,
        }

    def _reserve(
        self, s: Session, grants: list[ledger.Grant], now: datetime, epoch: int
    ) -> list[int | None]:
        """Reserve the pass's grants in one batch; on a conflict, one by one."""
        if not grants:
            return []
        try:
            with s.begin_nested():
                return list(ledger.reserve_many(s, grants, now=now, leader_epoch=epoch))
        except ledger.Conflict as e:
            log.warning("batch reservation conflicted (%s); reserving one by one", e)
        out: list[int | None] = []
        for g in grants:
            try:
                with s.begin_nested():
                    out.append(ledger.reserve_many(s, [g], now=now, leader_epoch=epoch)[0])
            except ledger.Conflict as e:
                log.warning("%s: lost a race (%s); it stays queued", g.holder, e)
                out.append(None)
        self.snapshots.snapshot = None  # the ledger moved under us: rebuild next pass
        return out

    def _remember(
        self,
        row: Any,
        state: str,
        aid: int | None,
        node: str | None,
        p: Any,
        msg: str,
        now: datetime,
        code: str = "placed",
    ) -> None:
        """Keep a decision in memory so that a waiting handler answers without a query."""
        self.decisions[row.id] = {
            "state": state,
            "code": code,
            "reason": msg,
            "decided": now,
            "allocation": None
            if aid is None
            else {
                "id": aid,
                "node": node,
                "gpu_indices": list(p.gpu_indices),
                "gpu_uuids": list(p.gpu_uuids),
                "gpu_milli_per_gpu": p.gpu_milli_per_gpu,
                "cpu_milli": p.cpu_milli,
                "memory_mib": p.memory_mib,
                "state": "active",
            },
        }
        while len(self.decisions) > 10_000:
            self.decisions.pop(next(iter(self.decisions)))

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
                    if self._wake.is_set() and self.gather_s > 0:
                        # Let requests arriving together share one pass (one transaction).
                        await asyncio.sleep(self.gather_s)
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


Describe = Callable[[Session, PlacementRequestRow], Any]


class SubmitQueue:
    """Group commit of placement submissions, off the event loop.

    Handlers ``await submit(...)``; one worker thread writes everything that arrived while
    the previous batch was being committed in one transaction (:meth:`Scheduler.submit_many`).
    Under load a batch holds many requests, so the database sees a few transactions per
    scheduling pass instead of one per request; an idle server commits a lone request at once.
    A batch that fails is retried one submission at a time, so one bad request fails alone.
    """

    def __init__(self, scheduler: Scheduler, describe: Describe, max_batch: int = 256) -> None:
        self.scheduler = scheduler
        self.describe = describe
        self.max_batch = max_batch
        self._pending: list[tuple[Submission, asyncio.Future[tuple[int, bool, datetime, Any]]]] = []
        self._draining = False
        self._task: asyncio.Future[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nsml-submit")

    async def submit(self, sub: Submission) -> tuple[int, bool, datetime, Any]:
        """Queue *sub*; returns ``(request id, fresh, created, described)``.

        *described* is ``describe(session, row)`` for a request that already existed (read in
        the same transaction), None for a fresh one.
        """
        fut: asyncio.Future[tuple[int, bool, datetime, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending.append((sub, fut))
        if not self._draining:
            self._draining = True
            self._task = asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                subs = [b[0] for b in batch]
                try:
                    results: list[Any] = await loop.run_in_executor(
                        self._executor, self._commit, subs
                    )
                except Exception as e:
                    if len(batch) == 1:
                        results = [e]
                    else:
                        log.warning(
                            "a batch of %d submissions failed (%s); one by one", len(subs), e
                        )
                        results = []
                        for sub in subs:
                            try:
                                results += await loop.run_in_executor(
                                    self._executor, self._commit, [sub]
                                )
                            except Exception as e1:
                                results.append(e1)
                self.scheduler.wake()  # committed: the next pass sees them
                for (_, fut), r in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(r, Exception):
                        fut.set_exception(r)
                    else:
                        fut.set_result(r)
        finally:
            self._draining = False

    def _commit(self, subs: list[Submission]) -> list[tuple[int, bool, datetime, Any]]:
        with self.scheduler.db.session() as s:
            out: list[tuple[int, bool, datetime, Any]] = []
            for rid, fresh, created in self.scheduler.submit_many(s, subs):
                described = None
                if not fresh:  # an existing request: describe it from this transaction
                    row = s.get(PlacementRequestRow, rid)
                    assert row is not None
                    described = self.describe(s, row)
                out.append((rid, fresh, created, described))
            return out

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
