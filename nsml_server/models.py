"""SQLAlchemy 2 models of the NSML database.

The NSML server is the only writer of these tables; every other process (node agents, the
spawner, the client) goes through its REST API. Schema changes are Alembic migrations in
``nsml_server/migrations/versions``; never change a table here without one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NODE_STATES = ("up", "draining", "down")
PERMISSION_LEVELS = ("user", "admin")


class Base(DeclarativeBase):
    """Declarative base with the project's constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    """A platform user, mirrored from JupyterHub on first contact.

    ``credits_milli`` is the balance in thousandths of a credit (integers, so that charges
    add up exactly); ``permission`` follows the hub's admin flag.
    """

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    permission: Mapped[str] = mapped_column(String(16), default="user")
    credits_milli: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)


class Node(Base):
    """A compute node: a Docker engine (or the local-process fallback) plus its GPUs."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    docker_url: Mapped[str | None] = mapped_column(String(1024))
    backend: Mapped[str] = mapped_column(String(32), default="docker")
    state: Mapped[str] = mapped_column(String(16), default="up")
    cpu_milli: Mapped[int] = mapped_column(Integer, default=0)
    memory_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    gpu_probe: Mapped[dict[str, Any]] = mapped_column(default=dict)
    images: Mapped[list[Any]] = mapped_column(default=list)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[datetime] = mapped_column(DateTime)
    last_heartbeat: Mapped[datetime | None] = mapped_column(DateTime)

    gpus: Mapped[list[Gpu]] = relationship(
        back_populates="node", cascade="all, delete-orphan", order_by="Gpu.index"
    )


class Gpu(Base):
    """One GPU of a node, as the node's probe last reported it."""

    __tablename__ = "gpus"
    __table_args__ = (UniqueConstraint("node_id", "index", name="uq_gpus_node_id_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    uuid: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(255))
    memory_total_mib: Mapped[int] = mapped_column(Integer, default=0)
    memory_used_mib: Mapped[int] = mapped_column(Integer, default=0)
    utilization_pct: Mapped[int | None] = mapped_column(Integer)
    nvlink_peers: Mapped[list[Any]] = mapped_column(default=list)
    pcie_group: Mapped[int | None] = mapped_column(Integer)
    healthy: Mapped[bool] = mapped_column(Boolean, default=True)

    node: Mapped[Node] = relationship(back_populates="gpus")
