"""Console: users, login sessions and API tokens.

Revision ID: 0006_console
Revises: 0005_batch
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_console"
down_revision = "0005_batch"  # re-chained after merging main (was 0003_jobs)
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "console_user",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(length=64), nullable=False, unique=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        _ts("created_at"),
        sa.Column("disabled", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "console_session",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_sha256", sa.String(length=64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("console_user.id"), nullable=False, index=True),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
    )
    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_sha256", sa.String(length=64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("console_user.id"), nullable=False, index=True),
        sa.Column("label", sa.String(length=128), nullable=False),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
    )


def downgrade() -> None:
    op.drop_table("api_token")
    op.drop_table("console_session")
    op.drop_table("console_user")
