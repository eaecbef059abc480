"""leaderboards: submissions and their evaluations, and each dataset's leaderboard rules

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 12:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("daily_limit", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("eval_timeout_s", sa.Integer(), nullable=False, server_default="3600")
        )
        batch.add_column(sa.Column("eval_gpus", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("closed", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "submissions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "dataset_id",
            sa.Integer(),
            sa.ForeignKey("datasets.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("dataset_ref", sa.String(length=80), nullable=False),
        sa.Column("test_digest", sa.String(length=64), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column(
            "session_id",
            sa.Integer(),
            sa.ForeignKey("sessions.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("session_name", sa.String(length=512), nullable=False),
        sa.Column("checkpoint", sa.String(length=255), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=False),
        sa.Column("code_digest", sa.String(length=64), nullable=False),
        sa.Column("entry", sa.String(length=1024), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("image", sa.String(length=512), nullable=False),
        sa.Column("resources", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("placement_id", sa.Integer(), nullable=True),
        sa.Column("node", sa.String(length=255), nullable=True),
        sa.Column("gpu_ids", sa.JSON(), nullable=False),
        sa.Column("handle", sa.String(length=255), nullable=True),
        sa.Column("public_score", sa.Float(), nullable=True),
        sa.Column("private_score", sa.Float(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("submitted", sa.DateTime(), nullable=False),
        sa.Column("started", sa.DateTime(), nullable=True),
        sa.Column("finished", sa.DateTime(), nullable=True),
    )
    for column in ("dataset_id", "user_name", "session_id", "state", "submitted"):
        op.create_index(f"ix_submissions_{column}", "submissions", [column])


def downgrade() -> None:
    op.drop_table("submissions")
    with op.batch_alter_table("datasets") as batch:
        for column in ("closed", "eval_gpus", "eval_timeout_s", "daily_limit"):
            batch.drop_column(column)
