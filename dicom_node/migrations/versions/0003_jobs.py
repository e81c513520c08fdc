"""Jobs: model jobs, their outputs and the routing plan of each study revision.

Revision ID: 0003_jobs
Revises: 0002_outbox
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_jobs"
down_revision = "0002_outbox"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("idempotency_key", sa.String(length=64), nullable=False, unique=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("rule", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("series_uids", sa.JSON(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("lease_seconds", sa.Float(), nullable=False),
        _ts("lease_until"),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        _ts("published_at"),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        _ts("started_at"),
        _ts("finished_at"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("model_info", sa.JSON(), nullable=True),
    )
    op.create_index("ix_job_state", "job", ["state", "updated_at"])
    op.create_index("ix_job_study", "job", ["study_instance_uid", "revision"])
    op.create_table(
        "job_output",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("job.id"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("source_series_uid", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("relpath", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("outbox_ids", sa.JSON(), nullable=False),
        _ts("created_at", nullable=False),
        sa.UniqueConstraint("job_id", "sop_instance_uid", name="uq_job_output_sop"),
    )
    op.create_index("ix_job_output_job_id", "job_output", ["job_id"])
    op.create_table(
        "study_plan",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        _ts("planned_at", nullable=False),
        sa.Column("tasks_planned", sa.Integer(), nullable=False),
        sa.Column("job_ids", sa.JSON(), nullable=False),
        sa.Column("series_uids", sa.JSON(), nullable=False),
        sa.Column("unmatched_series", sa.JSON(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.UniqueConstraint("study_instance_uid", "revision", name="uq_study_plan_revision"),
    )


def downgrade() -> None:
    op.drop_table("study_plan")
    op.drop_index("ix_job_output_job_id", table_name="job_output")
    op.drop_table("job_output")
    op.drop_index("ix_job_study", table_name="job")
    op.drop_index("ix_job_state", table_name="job")
    op.drop_table("job")
