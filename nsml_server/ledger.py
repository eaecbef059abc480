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
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .models import Allocation, Gpu, Node

log = logging.getLogger("nsml_server.ledger")

GPU_MILLI = 1000


class Conflict(Exception):
    """The resources are no longer free (another reservation won); re-plan and retry."""


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
    that much free milli on the GPU. The node must be ``up``.
    """
    node_id = s.scalar(select(Node.id).where(Node.name == node_name))
    if node_id is None:
        raise Conflict(f"node {node_name} is not registered")
    r = s.execute(
        update(Node)
        .where(
            Node.id == node_id,
            Node.state == "up",
            Node.cpu_allocated_milli + cpu_milli <= Node.cpu_milli,
            Node.memory_allocated_mib + memory_mib <= Node.memory_mib,
        )
        .values(
            cpu_allocated_milli=Node.cpu_allocated_milli + cpu_milli,
            memory_allocated_mib=Node.memory_allocated_mib + memory_mib,
        )
        .execution_options(synchronize_session=False)
    )
    if r.rowcount != 1:
        raise Conflict(f"node {node_name} is not up or lacks CPU/memory")
    for index in gpu_indices:
        r = s.execute(
            update(Gpu)
            .where(
                Gpu.node_id == node_id,
                Gpu.index == index,
                Gpu.healthy.is_(True),
                Gpu.allocated_milli + gpu_milli_per_gpu <= GPU_MILLI,
            )
            .values(allocated_milli=Gpu.allocated_milli + gpu_milli_per_gpu)
            .execution_options(synchronize_session=False)
        )
        if r.rowcount != 1:
            raise Conflict(f"{node_name}:gpu{index} lacks {gpu_milli_per_gpu} free milli-GPU")
    alloc = Allocation(
        holder=holder,
        user_name=user_name,
        node_id=node_id,
        gpu_indices=list(gpu_indices),
        gpu_uuids=list(gpu_uuids),
        gpu_milli_per_gpu=gpu_milli_per_gpu,
        cpu_milli=cpu_milli,
        memory_mib=memory_mib,
        state="active",
        created=now,
        leader_epoch=leader_epoch,
        score=score or {},
    )
    s.add(alloc)
    s.flush()
    log.info(
        "allocation %d for %s: %s gpus %s x %d milli, %d mCPU, %d MiB",
        alloc.id,
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
    if r.rowcount != 1:
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


def active_for_holder(s: Session, holder: str) -> Allocation | None:
    return s.scalar(
        select(Allocation).where(Allocation.holder == holder, Allocation.state == "active")
    )
