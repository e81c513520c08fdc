"""Index: patient, study, study_revision, series, instance, duplicate_event, rejection.

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "patient",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("patient_key", sa.String(length=64), nullable=False, unique=True),
        sa.Column("patient_id", sa.Text(), nullable=False),
        sa.Column("patient_name", sa.Text(), nullable=True),
        _ts("created_at"),
    )
    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False, unique=True),
        sa.Column("patient_pk", sa.Integer(), sa.ForeignKey("patient.id"), nullable=False),
        sa.Column("accession_number", sa.Text(), nullable=True),
        sa.Column("study_date", sa.Text(), nullable=True),
        sa.Column("study_description", sa.Text(), nullable=True),
        sa.Column("current_revision", sa.Integer(), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("last_received_at"),
    )
    op.create_index("ix_study_patient_pk", "study", ["patient_pk"])
    op.create_table(
        "study_revision",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_pk", sa.Integer(), sa.ForeignKey("study.id"), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        _ts("first_received_at"),
        _ts("last_received_at"),
        _ts("completed_at", nullable=True),
        sa.Column("reason", sa.String(length=16), nullable=True),
        _ts("notified_at", nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.UniqueConstraint("study_pk", "revision", name="uq_study_revision"),
    )
    op.create_index("ix_study_revision_state", "study_revision", ["state"])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False, unique=True),
        sa.Column("study_pk", sa.Integer(), sa.ForeignKey("study.id"), nullable=False),
        sa.Column("modality", sa.Text(), nullable=True),
        sa.Column("body_part_examined", sa.Text(), nullable=True),
        sa.Column("series_description", sa.Text(), nullable=True),
        sa.Column("series_number", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        _ts("first_received_at"),
        _ts("last_received_at"),
        _ts("completed_at", nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
    )
    op.create_index("ix_series_study_pk", "series", ["study_pk"])
    op.create_index("ix_series_state", "series", ["state"])
    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False, unique=True),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("series_pk", sa.Integer(), sa.ForeignKey("series.id"), nullable=False),
        sa.Column("study_pk", sa.Integer(), sa.ForeignKey("study.id"), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("instance_number", sa.BigInteger(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("relpath", sa.String(length=512), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("called_ae", sa.String(length=16), nullable=False),
        sa.Column("remote_ip", sa.String(length=64), nullable=False),
        _ts("received_at"),
        sa.Column("duplicate_count", sa.Integer(), nullable=False),
        _ts("last_duplicate_at", nullable=True),
    )
    op.create_index("ix_instance_series_pk", "instance", ["series_pk"])
    op.create_index("ix_instance_study_pk", "instance", ["study_pk"])
    op.create_table(
        "duplicate_event",
        sa.Column("id", sa.Integer(), primary_key=True),
        _ts("at"),
        sa.Column("instance_pk", sa.Integer(), sa.ForeignKey("instance.id"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("policy", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("previous_sha256", sa.String(length=64), nullable=False),
        sa.Column("previous_relpath", sa.String(length=512), nullable=False),
        sa.Column("received_sha256", sa.String(length=64), nullable=False),
        sa.Column("received_relpath", sa.String(length=512), nullable=False),
        sa.Column("received_size", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("remote_ip", sa.String(length=64), nullable=False),
    )
    op.create_index("ix_duplicate_event_at", "duplicate_event", ["at"])
    op.create_index("ix_duplicate_event_instance_pk", "duplicate_event", ["instance_pk"])
    op.create_table(
        "rejection",
        sa.Column("id", sa.Integer(), primary_key=True),
        _ts("at"),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("called_ae", sa.String(length=16), nullable=True),
        sa.Column("remote_ip", sa.String(length=64), nullable=True),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=True),
    )
    op.create_index("ix_rejection_at", "rejection", ["at"])
    op.create_index("ix_rejection_reason", "rejection", ["reason"])


def downgrade() -> None:
    for table in ("rejection", "duplicate_event", "instance", "series", "study_revision", "study", "patient"):
        op.drop_table(table)
