"""metric batches: a report batch's id, stored once per session

The SDK retries a batch of report points (under the same id) when the answer was lost; the
id is kept with the chunk, unique per session, so that a retry, even one that reaches
another server at the same moment, is stored once.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("session_metric_chunks") as batch:
        batch.add_column(sa.Column("batch", sa.String(length=128), nullable=True))
        batch.create_unique_constraint(
            "uq_session_metric_chunks_session_id_batch", ["session_id", "batch"]
        )


def downgrade() -> None:
    with op.batch_alter_table("session_metric_chunks") as batch:
        batch.drop_constraint("uq_session_metric_chunks_session_id_batch", type_="unique")
        batch.drop_column("batch")
