"""Every study an MPPS names (Scheduled Step Attributes Sequence items), not only the first.

Revision ID: 0009_mpps_studies
Revises: 0008_completion_reason
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_mpps_studies"
down_revision = "0008_completion_reason"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mpps_study",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("mpps_pk", sa.Integer(), sa.ForeignKey("mpps.id"), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.UniqueConstraint("mpps_pk", "study_instance_uid", name="uq_mpps_study"),
    )
    op.create_index("ix_mpps_study_mpps_pk", "mpps_study", ["mpps_pk"])
    op.create_index("ix_mpps_study_study_instance_uid", "mpps_study", ["study_instance_uid"])
    # Steps stored before this revision named their first study only: keep holding it.
    op.execute(
        "INSERT INTO mpps_study (mpps_pk, study_instance_uid) "
        "SELECT id, study_instance_uid FROM mpps WHERE study_instance_uid IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_table("mpps_study")
