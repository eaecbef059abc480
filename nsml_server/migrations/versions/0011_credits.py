"""credits: the credit ledger and policy, teams, permission levels and limits, the audit log

``credit_ledger`` is append-only; ``users.credits_milli`` / ``teams.credits_milli`` are cached
balances updated with each row. A charge is unique per ``(allocation_id, interval_start)``,
so no billing interval is charged twice. ``users`` gains the NSML permission level, per-user
limit overrides, the hub groups seen at the last contact, the team that pays, and the
low-balance warning flag.

Existing balances (given before the ledger existed) are written into the ledger as one
``grant`` each, so that every balance can be recomputed from the ledger.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("level", sa.String(length=16), nullable=False, server_default="user")
        )
        batch.add_column(sa.Column("max_gpus", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_running", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("groups", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("billing_team", sa.String(length=255), nullable=True))
        batch.add_column(
            sa.Column("credits_warned", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute("UPDATE users SET level = 'admin' WHERE permission = 'admin'")

    op.create_table(
        "credit_ledger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_kind", sa.String(length=8), nullable=False),
        sa.Column("account", sa.String(length=255), nullable=False),
        sa.Column("amount_milli", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=True),
        sa.Column("session_id", sa.Integer(), nullable=True),
        sa.Column("server_name", sa.String(length=255), nullable=True),
        sa.Column("allocation_id", sa.Integer(), nullable=True),
        sa.Column("interval_start", sa.DateTime(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "account_kind IN ('user', 'team')", name=op.f("ck_credit_ledger_account_kind_valid")
        ),
        sa.CheckConstraint(
            "kind IN ('grant', 'charge', 'refund')", name=op.f("ck_credit_ledger_kind_valid")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_ledger")),
        sa.UniqueConstraint(
            "allocation_id", "interval_start", name=op.f("uq_credit_ledger_interval")
        ),
    )
    op.create_index("ix_credit_ledger_account", "credit_ledger", ["account_kind", "account", "id"])
    op.create_index(op.f("ix_credit_ledger_created"), "credit_ledger", ["created"])
    op.create_index("ix_credit_ledger_interval_start", "credit_ledger", ["interval_start"])
    op.execute(
        "INSERT INTO credit_ledger (account_kind, account, amount_milli, kind, reason, actor,"
        " created) SELECT 'user', name, credits_milli, 'grant',"
        " 'balance before the credit ledger', 'migration', created FROM users"
        " WHERE credits_milli != 0"
    )

    op.create_table(
        "credit_policy",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("gpu_hour_milli", sa.BigInteger(), nullable=False),
        sa.Column("gpu_hour_milli_by_model", sa.JSON(), nullable=False),
        sa.Column("cpu_hour_milli", sa.BigInteger(), nullable=False),
        sa.Column("memory_gb_hour_milli", sa.BigInteger(), nullable=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("warn_threshold_milli", sa.BigInteger(), nullable=False),
        sa.Column("admission_min_hours", sa.Float(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.Column("updated_by", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_policy")),
    )

    op.create_table(
        "teams",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("pays", sa.Boolean(), nullable=False),
        sa.Column("credits_milli", sa.BigInteger(), nullable=False),
        sa.Column("credits_warned", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_teams")),
        sa.UniqueConstraint("name", name=op.f("uq_teams_name")),
    )
    op.create_table(
        "team_admins",
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name=op.f("fk_team_admins_team_id_teams"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("team_id", "user_name", name=op.f("pk_team_admins")),
    )
    op.create_table(
        "level_limits",
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("max_gpus", sa.Integer(), nullable=True),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("level", name=op.f("pk_level_limits")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=512), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_actor"), "audit_log", ["actor"])
    op.create_index(op.f("ix_audit_log_created"), "audit_log", ["created"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("level_limits")
    op.drop_table("team_admins")
    op.drop_table("teams")
    op.drop_table("credit_policy")
    op.drop_table("credit_ledger")
    with op.batch_alter_table("users") as batch:
        for column in (
            "credits_warned",
            "billing_team",
            "groups",
            "priority",
            "max_running",
            "max_gpus",
            "level",
        ):
            batch.drop_column(column)
