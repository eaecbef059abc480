"""datasets: names, versions, uploads in progress, node-cache holds; nodes.datasets

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 15:00:25.389151
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_uploads",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("missing_bytes", sa.BigInteger(), nullable=False),
        sa.Column("test_upload_id", sa.String(length=32), nullable=True),
        sa.Column("test_digest", sa.String(length=64), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_uploads")),
    )
    with op.batch_alter_table("dataset_uploads", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dataset_uploads_name"), ["name"], unique=False)
        batch_op.create_index(batch_op.f("ix_dataset_uploads_owner"), ["owner"], unique=False)

    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("visibility", sa.String(length=16), nullable=False),
        sa.Column("team", sa.String(length=255), nullable=True),
        sa.Column("metric", sa.String(length=64), nullable=True),
        sa.Column("higher_is_better", sa.Boolean(), nullable=True),
        sa.Column("next_version", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("last_access", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "visibility != 'team' OR team IS NOT NULL", name=op.f("ck_datasets_team_named")
        ),
        sa.CheckConstraint(
            "visibility IN ('private', 'team', 'public')", name=op.f("ck_datasets_visibility_valid")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("name", name=op.f("uq_datasets_name")),
    )
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_datasets_owner"), ["owner"], unique=False)

    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("new_bytes", sa.BigInteger(), nullable=False),
        sa.Column("test_digest", sa.String(length=64), nullable=True),
        sa.Column("test_bytes", sa.BigInteger(), nullable=False),
        sa.Column("test_files", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("last_access", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_dataset_versions_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_versions")),
        sa.UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_k"),
    )
    with op.batch_alter_table("dataset_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dataset_versions_dataset_id"), ["dataset_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_dataset_versions_digest"), ["digest"], unique=False)

    op.create_table(
        "dataset_holds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("allocation_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("host_path", sa.Text(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "state IN ('preparing', 'ready', 'failed', 'released')",
            name=op.f("ck_dataset_holds_state_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["allocation_id"],
            ["allocations.id"],
            name=op.f("fk_dataset_holds_allocation_id_allocations"),
        ),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_dataset_holds_node_id_nodes")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_holds")),
        sa.UniqueConstraint("allocation_id", "key", name="uq_dataset_holds_allocation_key"),
    )
    with op.batch_alter_table("dataset_holds", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dataset_holds_allocation_id"), ["allocation_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_dataset_holds_dataset"), ["dataset"], unique=False)
        batch_op.create_index(batch_op.f("ix_dataset_holds_node_id"), ["node_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_dataset_holds_state"), ["state"], unique=False)

    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("datasets", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("datasets")

    with op.batch_alter_table("dataset_holds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_holds_state"))
        batch_op.drop_index(batch_op.f("ix_dataset_holds_node_id"))
        batch_op.drop_index(batch_op.f("ix_dataset_holds_dataset"))
        batch_op.drop_index(batch_op.f("ix_dataset_holds_allocation_id"))

    op.drop_table("dataset_holds")
    with op.batch_alter_table("dataset_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_versions_digest"))
        batch_op.drop_index(batch_op.f("ix_dataset_versions_dataset_id"))

    op.drop_table("dataset_versions")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_datasets_owner"))

    op.drop_table("datasets")
    with op.batch_alter_table("dataset_uploads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_uploads_owner"))
        batch_op.drop_index(batch_op.f("ix_dataset_uploads_name"))

    op.drop_table("dataset_uploads")
