"""Batch items: count crashes (unexpected exceptions) per item, for the crash metric.

Revision ID: 0007_batch_crashes
Revises: 0006_console
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_batch_crashes"
down_revision = "0006_console"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batch_item") as batch:
        batch.add_column(sa.Column("crashes", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("batch_item") as batch:
        batch.drop_column("crashes")
