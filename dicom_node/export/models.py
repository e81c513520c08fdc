"""The outbox table: one row per (result object, destination) still to deliver or delivered.

Times are aware UTC (SQLModel's UTCDateTime: timestamptz on PostgreSQL, UTC text on SQLite).
The migration that creates the table is ``dicom_node/migrations/versions/0002_outbox.py``;
keep both in step.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from dicom_node.leases import DONE, FAILED

PENDING = "pending"
SENDING = "sending"  # claimed by an exporter holding an unexpired lease
# A LABELMAP SEG the destination refused, replaced by its BINARY re-rendering (row `fallback_of` = this id).
SUPERSEDED = "superseded"
STATES = (PENDING, SENDING, DONE, FAILED, SUPERSEDED)


class OutboxRow(SQLModel, table=True):
    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_sop_destination"),
        Index("ix_outbox_due", "state", "destination", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime
    updated_at: datetime
    relpath: str = Field(max_length=512)
    sha256: str = Field(max_length=64)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    sop_instance_uid: str = Field(max_length=64)
    sop_class_uid: str = Field(max_length=64)
    transfer_syntax_uid: str = Field(max_length=64)
    study_instance_uid: str | None = Field(default=None, max_length=64)
    series_instance_uid: str | None = Field(default=None, max_length=64)
    destination: str = Field(max_length=64)
    state: str = Field(default=PENDING, max_length=16)
    attempts: int = 0
    next_attempt_at: datetime
    # Claim/lease: a row is "sending" only while an exporter holds an unexpired lease on it.
    claim_token: str | None = Field(default=None, max_length=32)
    claimed_at: datetime | None = None
    lease_until: datetime | None = None
    last_status: int | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    warnings: int = 0
    done_at: datetime | None = None
    job_id: int | None = Field(default=None, index=True)
    fallback_of: int | None = Field(default=None, foreign_key="outbox.id")
