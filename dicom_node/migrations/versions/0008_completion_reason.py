"""Completion without waiting: series completion reason, ImagesInAcquisition and C-FIND counts, MPPS tables.

Revision ID: 0008_completion_reason
Revises: 0007_batch_crashes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_completion_reason"
down_revision = "0007_batch_crashes"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("completion_reason", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("expected_instances", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("count_acquisition", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("queried_instances", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("count_known", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("series") as batch:
        batch.alter_column("count_known", server_default=None)
    op.create_table(
        "mpps",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False, unique=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("remote_ip", sa.String(length=64), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("applied_at", nullable=True),
    )
    op.create_index("ix_mpps_study_instance_uid", "mpps", ["study_instance_uid"])
    op.create_index("ix_mpps_applied_at", "mpps", ["applied_at"])
    op.create_table(
        "mpps_reference",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("mpps_pk", sa.Integer(), sa.ForeignKey("mpps.id"), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.UniqueConstraint("mpps_pk", "sop_instance_uid", name="uq_mpps_reference"),
    )
    op.create_index("ix_mpps_reference_mpps_pk", "mpps_reference", ["mpps_pk"])
    op.create_index("ix_mpps_reference_sop_instance_uid", "mpps_reference", ["sop_instance_uid"])


def downgrade() -> None:
    op.drop_table("mpps_reference")
    op.drop_table("mpps")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("count_known")
        batch.drop_column("queried_instances")
        batch.drop_column("count_acquisition")
        batch.drop_column("expected_instances")
        batch.drop_column("completion_reason")
