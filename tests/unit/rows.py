"""Database rows that several unit tests build: work holding GPUs on the one node."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from nsml_server.models import Allocation, Node, PlacementRequestRow


def hold(
    s: Session, user: str, holder: str, gpus: list[int], created: datetime, gpu_milli: int = 1000
) -> Allocation:
    """An active allocation of *user* as *holder* ('alice:session/mnist/1', 'bob:notebook')
    on the database's first node, holding *gpus* since *created* (flushed: its id is set)."""
    node = s.scalar(select(Node))
    assert node is not None, "add a node first"
    a = Allocation(
        holder=holder,
        user_name=user,
        node_id=node.id,
        gpu_indices=gpus,
        gpu_milli_per_gpu=gpu_milli,
        created=created,
    )
    s.add(a)
    s.flush()
    return a


def placed(s: Session, a: Allocation) -> int:
    """The placed request that gave *a* (what a session's ``placement_id`` names); its id."""
    p = PlacementRequestRow(
        holder=a.holder,
        user_name=a.user_name,
        state="placed",
        allocation_id=a.id,
        created=a.created,
    )
    s.add(p)
    s.flush()
    return p.id
