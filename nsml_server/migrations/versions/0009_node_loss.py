"""node loss: sessions that restart when their node is lost; nodes fenced until swept

``sessions.restart_on_lost``: the user asked that the session be queued again (as its next
attempt, from its last checkpoint) when its node is lost, instead of ending ``lost``.
``nodes.needs_sweep``: work on the node was given up while the node was silent; the node
receives nothing new until the server has removed the containers of that work from its
engine (the orphan sweep), so that GPUs that may still be busy are never given twice.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 13:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(
            sa.Column("restart_on_lost", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(
            sa.Column("needs_sweep", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("needs_sweep")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("restart_on_lost")
