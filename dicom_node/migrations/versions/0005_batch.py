"""Research batch: batches, their items (one per study) and the results table rows.

Revision ID: 0005_batch
Revises: 0003_jobs
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_batch"
down_revision = "0004_job_crashes"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "batch_run",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(length=64), nullable=False, unique=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("out_dir", sa.Text(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("items_total", sa.Integer(), nullable=False),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        _ts("finished_at"),
        sa.Column("note", sa.Text(), nullable=True),
    )
    op.create_table(
        "batch_item",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("batch_id", sa.Integer(), sa.ForeignKey("batch_run.id"), nullable=False),
        sa.Column("idempotency_key", sa.String(length=64), nullable=False, unique=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("locator", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
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
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.UniqueConstraint("batch_id", "study_instance_uid", name="uq_batch_item_study"),
    )
    op.create_index("ix_batch_item_batch_id", "batch_item", ["batch_id"])
    op.create_index("ix_batch_item_state", "batch_item", ["batch_id", "state"])
    op.create_table(
        "batch_result",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("batch_id", sa.Integer(), sa.ForeignKey("batch_run.id"), nullable=False),
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("batch_item.id"), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("rule", sa.String(length=128), nullable=False),
        sa.Column("task", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("qa", sa.JSON(), nullable=False),
        sa.Column("segmentation", sa.JSON(), nullable=False),
        sa.Column("output_sop_instance_uids", sa.JSON(), nullable=False),
        sa.Column("output_paths", sa.JSON(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        _ts("created_at", nullable=False),
        sa.UniqueConstraint("item_id", "series_instance_uid", "task", "rule", name="uq_batch_result"),
    )
    op.create_index("ix_batch_result_batch_id", "batch_result", ["batch_id"])
    op.create_index("ix_batch_result_item_id", "batch_result", ["item_id"])


def downgrade() -> None:
    op.drop_table("batch_result")
    op.drop_table("batch_item")
    op.drop_table("batch_run")
