"""session team: sessions visible to a team; evaluations stopped by request

``sessions.team`` names the JupyterHub group whose members may read a session of visibility
``team`` (and whose team admins may stop it). ``submissions.stop_reason`` asks the evaluation
runner to stop an evaluation (``credits``: its user's credits ran out).
``ix_credit_ledger_session_id`` lets the API sum a session's charges (its ``credits_used``).

On PostgreSQL the sessions table also gets the checks the datasets table has (a known
visibility; a team session names its team). SQLite cannot add a check to an existing table
without rebuilding it (other tables reference it), so there the API's validation alone holds.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 21:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("team", sa.String(length=255), nullable=True))
        batch.create_index(batch.f("ix_sessions_team"), ["team"], unique=False)
    with op.batch_alter_table("submissions") as batch:
        batch.add_column(sa.Column("stop_reason", sa.String(length=32), nullable=True))
    op.create_index("ix_credit_ledger_session_id", "credit_ledger", ["session_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.create_check_constraint(
            op.f("ck_sessions_visibility_valid"),
            "sessions",
            "visibility IN ('private', 'team', 'public')",
        )
        op.create_check_constraint(
            op.f("ck_sessions_team_named"), "sessions", "visibility != 'team' OR team IS NOT NULL"
        )


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later, PostgreSQL): a batch rebuild
    # of ``sessions`` on SQLite would drop the table its events and checkpoints reference.
    op.execute("UPDATE sessions SET visibility = 'private' WHERE visibility = 'team'")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(op.f("ck_sessions_team_named"), "sessions", type_="check")
        op.drop_constraint(op.f("ck_sessions_visibility_valid"), "sessions", type_="check")
    op.drop_index("ix_credit_ledger_session_id", "credit_ledger")
    op.drop_column("submissions", "stop_reason")
    op.drop_index(op.f("ix_sessions_team"), "sessions")
    op.drop_column("sessions", "team")
