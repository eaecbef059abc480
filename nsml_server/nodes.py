"""Node registry: apply heartbeats, mark silent nodes down, drain nodes.

Plain functions over a SQLAlchemy session; the caller owns the transaction and the clock.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload

from .models import Gpu, Node
from .schemas import GpuOut, Heartbeat, NodeOut

log = logging.getLogger("nsml_server.nodes")


def apply_heartbeat(
    s: Session,
    name: str,
    hb: Heartbeat,
    now: datetime,
    gpu_use: Any = None,
    known: Mapping[str, Node] | None = None,
) -> Node:
    """Create or refresh node *name* from a heartbeat (and, given a
    :class:`~nsml_server.gpu_use.GpuUseMonitor` as *gpu_use*, sample its sessions' GPU use).

    *known*: nodes (with their GPUs) the caller loaded already, by name; a name missing from
    it is a new node. None: look the node up.

    A node that was ``down`` comes back ``up``; a ``draining`` node stays draining (only an
    admin undrains it). GPUs are matched by index; a GPU that vanished from the report stays
    listed but unhealthy, so that allocations that name it remain explainable.
    """
    if known is not None:
        node = known.get(name)
    else:
        node = s.scalar(select(Node).where(Node.name == name).options(selectinload(Node.gpus)))
    if node is None:
        node = Node(name=name, created=now, state="up")
        s.add(node)
        log.info("node %s registered (%s, %d GPUs)", name, hb.backend, len(hb.gpus))
    elif node.state == "down":
        log.info("node %s is back up", name)
        node.state = "up"
    node.backend = hb.backend
    node.docker_url = hb.docker_url
    node.cpu_milli = hb.cpu_milli
    node.memory_mib = hb.memory_mib
    node.gpu_probe = hb.gpu_probe.model_dump()
    node.images = sorted(set(hb.images))
    node.labels = dict(hb.labels)
    node.datasets = dict(hb.datasets)
    node.last_heartbeat = now
    by_index = {g.index: g for g in node.gpus}
    seen = set()
    for rep in hb.gpus:
        seen.add(rep.index)
        gpu = by_index.get(rep.index)
        if gpu is None:
            gpu = Gpu(index=rep.index)
            node.gpus.append(gpu)
        gpu.uuid = rep.uuid
        gpu.model = rep.model
        gpu.memory_total_mib = rep.memory_total_mib
        gpu.memory_used_mib = rep.memory_used_mib
        gpu.utilization_pct = rep.utilization_pct
        gpu.nvlink_peers = list(rep.nvlink_peers)
        gpu.pcie_group = rep.pcie_group
        gpu.healthy = True
    for index, gpu in by_index.items():
        if index not in seen and gpu.healthy:
            log.warning("node %s:gpu%d no longer reported; marked unhealthy", name, index)
            gpu.healthy = False
    if gpu_use is not None:
        gpu_use.record(s, name, hb, now)
    return node


def mark_silent_nodes_down(s: Session, now: datetime, timeout: timedelta) -> list[str]:
    """Mark ``up``/``draining`` nodes whose last heartbeat is older than *timeout* as ``down``."""
    cutoff = now - timeout
    names = list(
        s.scalars(
            select(Node.name).where(
                Node.state != "down",
                (Node.last_heartbeat.is_(None)) | (Node.last_heartbeat < cutoff),
            )
        )
    )
    if names:
        s.execute(update(Node).where(Node.name.in_(names)).values(state="down"))
        for name in names:
            log.warning("node %s missed heartbeats for %ss; marked down", name, timeout.seconds)
    return names


def list_nodes(s: Session, state: str | None = None) -> list[Node]:
    """Nodes (with GPUs) ordered by name, optionally only those in *state*."""
    q = select(Node).options(selectinload(Node.gpus)).order_by(Node.name)
    if state is not None:
        q = q.where(Node.state == state)
    return list(s.scalars(q))


def get_node(s: Session, name: str) -> Node | None:
    return s.scalar(select(Node).where(Node.name == name).options(selectinload(Node.gpus)))


def node_out(node: Node, now: datetime) -> NodeOut:
    """The API view of a node."""
    hb = node.last_heartbeat
    virtual = (node.gpu_probe or {}).get("kind") == "virtual"
    return NodeOut(
        name=node.name,
        state=node.state,  # type: ignore[arg-type]
        backend=node.backend,
        docker_url=node.docker_url,
        cpu_milli=node.cpu_milli,
        memory_mib=node.memory_mib,
        gpu_probe={**node.gpu_probe, "virtual": virtual},
        gpus=[
            GpuOut(
                index=g.index,
                uuid=g.uuid,
                model=g.model,
                memory_total_mib=g.memory_total_mib,
                memory_used_mib=g.memory_used_mib,
                utilization_pct=g.utilization_pct,
                nvlink_peers=list(g.nvlink_peers),
                pcie_group=g.pcie_group,
                healthy=g.healthy,
                allocated_milli=g.allocated_milli,
                virtual=virtual,
            )
            for g in node.gpus
        ],
        images=list(node.images),
        labels=dict(node.labels),
        datasets=dict(node.datasets or {}),
        last_heartbeat=hb.isoformat() + "Z" if hb else None,
        heartbeat_age_s=round((now - hb).total_seconds(), 3) if hb else None,
        needs_sweep=bool(node.needs_sweep),
    )
