"""metric arrays: report batches also stored as arrays, so plots skip decoding JSON

``session_metric_chunks.arrays``: the batch's columns as little-endian arrays (steps, times,
each metric's values and, where some step lacks it, which steps have it). A comparison panel
of 100 sessions x 10,000 points read 100 JSON batches (~10 ms each to decode); arrays are read
in place. Batches stored before this revision keep None and are decoded from their JSON.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 15:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("session_metric_chunks") as batch:
        batch.add_column(sa.Column("arrays", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("session_metric_chunks") as batch:
        batch.drop_column("arrays")
