"""The allocation ledger: reserve and release resources so that none is ever given twice.

The guarantee does not rest on the scheduler being right, nor on a single process: every
reservation is a set of *conditional* UPDATEs (``... SET allocated = allocated + x WHERE
allocated + x <= capacity``), which the database applies atomically row by row, under
concurrent transactions and across server processes, on SQLite and PostgreSQL alike. A
CHECK constraint on ``gpus.allocated_milli`` backs it up. If any row refuses, the whole
reservation fails with :class:`Conflict` and the caller's transaction rolls back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from .models import Allocation, Gpu, Node

log = logging.getLogger("nsml_server.ledger")

GPU_MILLI = 1000


class Conflict(Exception):
    """The resources are no longer free (another reservation won); re-plan and retry."""


# The guarantee, stated once: a claim succeeds only if the row still has room for it. Both
# statements take bind parameters: one claim (execute) and a batch (executemany) share them.
_CLAIM_NODE = (
    update(Node)
    .where(
        Node.id == bindparam("nid"),
        Node.state == "up",
        # A node that was lost gets nothing until its orphans are swept (node_loss.py).
        Node.needs_sweep.is_(False),
        Node.cpu_allocated_milli + bindparam("cpu") <= Node.cpu_milli,
        Node.memory_allocated_mib + bindparam("mem") <= Node.memory_mib,
    )
    .values(
        cpu_allocated_milli=Node.cpu_allocated_milli + bindparam("cpu"),
        memory_allocated_mib=Node.memory_allocated_mib + bindparam("mem"),
    )
)
_CLAIM_GPU = (
    update(Gpu)
    .where(
        Gpu.node_id == bindparam("nid"),
        Gpu.index == bindparam("idx"),
        Gpu.healthy.is_(True),
        Gpu.allocated_milli + bindparam("milli") <= GPU_MILLI,
    )
    .values(allocated_milli=Gpu.allocated_milli + bindparam("milli"))
)


def reserve(
    s: Session,
    *,
    holder: str,
    user_name: str,
    node_name: str,
    gpu_indices: Sequence[int],
    gpu_uuids: Sequence[str] = (),
    gpu_milli_per_gpu: int,
    cpu_milli: int,
    memory_mib: int,
    now: datetime,
    leader_epoch: int = 0,
    score: dict[str, Any] | None = None,
) -> Allocation:
    """Reserve resources on *node_name* for *holder*; raise :class:`Conflict` if they are gone.

    Whole GPUs (``gpu_milli_per_gpu == 1000``) need the GPU completely free; a fraction needs
    that much free milli on the GPU. The node must be ``up``. One row at a time, so that a
    conflict names the GPU that refused; :func:`reserve_many` is the batched form.
    """
    node_id = s.scalar(select(Node.id).where(Node.name == node_name))
    if node_id is None:
        raise Conflict(f"node {node_name} is not registered")
    conn = s.connection()
    r = conn.execute(_CLAIM_NODE, {"nid": node_id, "cpu": cpu_milli, "mem": memory_mib})
    if r.rowcount != 1:
        raise Conflict(f"node {node_name} is not up or lacks CPU/memory")
    for index in gpu_indices:
        r = conn.execute(_CLAIM_GPU, {"nid": node_id, "idx": index, "milli": gpu_milli_per_gpu})
        if r.rowcount != 1:
            raise Conflict(f"{node_name}:gpu{index} lacks {gpu_milli_per_gpu} free milli-GPU")
    grant = Grant(
        holder=holder,
        user_name=user_name,
        node_id=node_id,
        gpu_indices=tuple(gpu_indices),
        gpu_uuids=tuple(gpu_uuids),
        gpu_milli_per_gpu=gpu_milli_per_gpu,
        cpu_milli=cpu_milli,
        memory_mib=memory_mib,
        score=score or {},
    )
    (alloc_id,) = _insert_allocations(s, [grant], now, leader_epoch)
    alloc = s.get(Allocation, alloc_id)
    assert alloc is not None
    log.info(
        "allocation %d for %s: %s gpus %s x %d milli, %d mCPU, %d MiB",
        alloc_id,
        holder,
        node_name,
        list(gpu_indices),
        gpu_milli_per_gpu,
        cpu_milli,
        memory_mib,
    )
    return alloc


def release(s: Session, allocation_id: int, now: datetime) -> bool:
    """Release an allocation. Idempotent: False (and no change) if it was already released."""
    r = s.execute(
        update(Allocation)
        .where(Allocation.id == allocation_id, Allocation.state == "active")
        .values(state="released", released=now)
        .execution_options(synchronize_session=False)
    )
    if cast(CursorResult[Any], r).rowcount != 1:
        return False
    alloc = s.get(Allocation, allocation_id)
    assert alloc is not None
    s.refresh(alloc)
    s.execute(
        update(Node)
        .where(Node.id == alloc.node_id)
        .values(
            cpu_allocated_milli=Node.cpu_allocated_milli - alloc.cpu_milli,
            memory_allocated_mib=Node.memory_allocated_mib - alloc.memory_mib,
            # Released while its node is down: nobody saw the container end, so the node
            # takes nothing new until the orphan sweep removed it (node_loss.py).
            needs_sweep=or_(Node.needs_sweep, Node.state == "down"),
        )
        .execution_options(synchronize_session=False)
    )
    for index in alloc.gpu_indices:
        s.execute(
            update(Gpu)
            .where(Gpu.node_id == alloc.node_id, Gpu.index == index)
            .values(allocated_milli=Gpu.allocated_milli - alloc.gpu_milli_per_gpu)
            .execution_options(synchronize_session=False)
        )
    log.info("allocation %d of %s released", alloc.id, alloc.holder)
    return True


@dataclass(frozen=True)
class Grant:
    """One reservation of a batch (see :func:`reserve_many`)."""

    holder: str
    user_name: str
    node_id: int
    gpu_indices: tuple[int, ...]
    gpu_uuids: tuple[str, ...]
    gpu_milli_per_gpu: int
    cpu_milli: int
    memory_mib: int
    score: dict[str, Any] = field(default_factory=dict)


def reserve_many(
    s: Session, grants: Sequence[Grant], *, now: datetime, leader_epoch: int = 0
) -> list[int]:
    """Reserve a batch in a few statements; all or nothing (raise :class:`Conflict`).

    The same conditional UPDATEs as :func:`reserve`, sent as one ``executemany`` per table
    with the amounts summed per node and per GPU; the matched row count must equal the
    number of rows aimed at. Returns the new allocation ids in the order of *grants*.
    """
    if not grants:
        return []
    per_node: dict[int, list[int]] = {}
    per_gpu: dict[tuple[int, int], int] = {}
    for g in grants:
        tot = per_node.setdefault(g.node_id, [0, 0])
        tot[0] += g.cpu_milli
        tot[1] += g.memory_mib
        for i in g.gpu_indices:
            per_gpu[(g.node_id, i)] = per_gpu.get((g.node_id, i), 0) + g.gpu_milli_per_gpu
    conn = s.connection()
    r = conn.execute(
        _CLAIM_NODE, [{"nid": n, "cpu": c, "mem": m} for n, (c, m) in per_node.items()]
    )
    if r.rowcount != len(per_node):
        raise Conflict("a node is no longer up or lacks CPU/memory")
    if per_gpu:
        r = conn.execute(
            _CLAIM_GPU, [{"nid": n, "idx": i, "milli": m} for (n, i), m in per_gpu.items()]
        )
        if r.rowcount != len(per_gpu):
            raise Conflict("a GPU no longer has the milli-GPU asked for")
    ids = _insert_allocations(s, grants, now, leader_epoch)
    log.info("reserved %d allocations in one batch (epoch %d)", len(ids), leader_epoch)
    return ids


def _insert_allocations(
    s: Session, grants: Sequence[Grant], now: datetime, leader_epoch: int
) -> list[int]:
    """Insert the allocation rows of already claimed *grants*; their ids, in order."""
    rows = (
        s.connection()
        .execute(
            insert(Allocation).returning(Allocation.id, sort_by_parameter_order=True),
            [
                {
                    "holder": g.holder,
                    "user_name": g.user_name,
                    "node_id": g.node_id,
                    "gpu_indices": list(g.gpu_indices),
                    "gpu_uuids": list(g.gpu_uuids),
                    "gpu_milli_per_gpu": g.gpu_milli_per_gpu,
                    "cpu_milli": g.cpu_milli,
                    "memory_mib": g.memory_mib,
                    "state": "active",
                    "created": now,
                    "released": None,
                    "leader_epoch": leader_epoch,
                    "score": g.score,
                }
                for g in grants
            ],
        )
        .all()
    )
    return [int(row[0]) for row in rows]
