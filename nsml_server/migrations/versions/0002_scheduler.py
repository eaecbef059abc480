"""allocation ledger, placement queue, leader lease

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 12:54:35.298700
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("renewed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    op.create_table(
        "allocations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("gpu_indices", sa.JSON(), nullable=False),
        sa.Column("gpu_uuids", sa.JSON(), nullable=False),
        sa.Column("gpu_milli_per_gpu", sa.Integer(), nullable=False),
        sa.Column("cpu_milli", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("released", sa.DateTime(), nullable=True),
        sa.Column("leader_epoch", sa.Integer(), nullable=False),
        sa.Column("score", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_allocations_node_id_nodes")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_allocations")),
    )
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_allocations_node_id"), ["node_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_allocations_user_name"), ["user_name"], unique=False)
        batch_op.create_index(
            "uq_allocations_active_holder",
            ["holder"],
            unique=True,
            sqlite_where=sa.text("state = 'active'"),
            postgresql_where=sa.text("state = 'active'"),
        )

    op.create_table(
        "placement_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("position", sa.Integer(), nullable=True),
        sa.Column("allocation_id", sa.Integer(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("decided", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["allocation_id"],
            ["allocations.id"],
            name=op.f("fk_placement_requests_allocation_id_allocations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_placement_requests")),
    )
    with op.batch_alter_table("placement_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_placement_requests_holder"), ["holder"], unique=False)
        batch_op.create_index(batch_op.f("ix_placement_requests_state"), ["state"], unique=False)

    with op.batch_alter_table("gpus", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("allocated_milli", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.create_check_constraint(
            "allocated_within_capacity", "allocated_milli >= 0 AND allocated_milli <= 1000"
        )

    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cpu_allocated_milli", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("memory_allocated_mib", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.create_check_constraint("cpu_allocated_nonnegative", "cpu_allocated_milli >= 0")
        batch_op.create_check_constraint(
            "memory_allocated_nonnegative", "memory_allocated_mib >= 0"
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_constraint("memory_allocated_nonnegative", type_="check")
        batch_op.drop_constraint("cpu_allocated_nonnegative", type_="check")
        batch_op.drop_column("memory_allocated_mib")
        batch_op.drop_column("cpu_allocated_milli")

    with op.batch_alter_table("gpus", schema=None) as batch_op:
        batch_op.drop_constraint("allocated_within_capacity", type_="check")
        batch_op.drop_column("allocated_milli")

    with op.batch_alter_table("placement_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_placement_requests_state"))
        batch_op.drop_index(batch_op.f("ix_placement_requests_holder"))

    op.drop_table("placement_requests")
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_allocations_active_holder",
            sqlite_where=sa.text("state = 'active'"),
            postgresql_where=sa.text("state = 'active'"),
        )
        batch_op.drop_index(batch_op.f("ix_allocations_user_name"))
        batch_op.drop_index(batch_op.f("ix_allocations_node_id"))

    op.drop_table("allocations")
    op.drop_table("leases")
