"""user notices: what billing tells a user, for every server process's event stream

``user_notices`` holds the notices (credits low, a GPU notebook server about to be stopped
for credits) that the billing leader writes in the transaction that decided them; each
server process's event stream reads the new rows, so a notebook gets them whichever process
serves its stream.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 09:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_notices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_notices")),
    )
    op.create_index(op.f("ix_user_notices_user_name"), "user_notices", ["user_name"])
    op.create_index(op.f("ix_user_notices_created"), "user_notices", ["created"])


def downgrade() -> None:
    op.drop_index(op.f("ix_user_notices_created"), "user_notices")
    op.drop_index(op.f("ix_user_notices_user_name"), "user_notices")
    op.drop_table("user_notices")
