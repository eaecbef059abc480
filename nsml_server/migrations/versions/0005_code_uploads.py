"""code uploads: who uploaded which code snapshot

A code snapshot's digest names its content; a session may run a snapshot only when its user
uploaded it, can read a session that runs it, or is an admin. Existing sessions' users are
recorded as having uploaded the snapshots their sessions run.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "code_uploads",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("digest", "user_name", name=op.f("pk_code_uploads")),
    )
    op.execute(
        "INSERT INTO code_uploads (digest, user_name, created) "
        "SELECT code_digest, user_name, MIN(created) FROM sessions "
        "GROUP BY code_digest, user_name"
    )


def downgrade() -> None:
    op.drop_table("code_uploads")
