"""Outbox: result objects queued for delivery to PACS destinations.

Revision ID: 0002_outbox
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_outbox"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("relpath", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("warnings", sa.Integer(), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("fallback_of", sa.Integer(), sa.ForeignKey("outbox.id"), nullable=True),
        sa.UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_sop_destination"),
    )
    op.create_index("ix_outbox_due", "outbox", ["state", "destination", "next_attempt_at"])
    op.create_index("ix_outbox_job_id", "outbox", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_job_id", table_name="outbox")
    op.drop_index("ix_outbox_due", table_name="outbox")
    op.drop_table("outbox")
