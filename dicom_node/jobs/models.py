"""Job tables: model jobs, the objects they produced, and the plan of each study revision.

A job is a row before it is a message: the planner commits it (state "planned"), then
publishes its id; workers claim it with one conditional UPDATE. Times are aware UTC.
The migration that creates these tables is `dicom_node/migrations/versions/0003_jobs.py`;
keep both in step.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from dicom_node.leases import DONE, FAILED

PLANNED = "planned"  # committed, not (known to be) published yet
QUEUED = "queued"  # published to the broker
RUNNING = "running"  # claimed by a worker holding an unexpired lease
STATES = (PLANNED, QUEUED, RUNNING, DONE, FAILED)


class Job(SQLModel, table=True):
    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_state", "state", "updated_at"),
        Index("ix_job_study", "study_instance_uid", "revision"),
    )

    id: int | None = Field(default=None, primary_key=True)
    # sha256 of (study, revision, task kind, parameters, model version, series): re-planning never duplicates.
    idempotency_key: str = Field(max_length=64, unique=True)
    study_instance_uid: str = Field(max_length=64)
    revision: int
    rule: str = Field(max_length=128)
    kind: str = Field(max_length=32)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    series_uids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    model_version: str = Field(max_length=128)
    queue: str = Field(max_length=64)
    state: str = Field(default=PLANNED, max_length=16)
    attempts: int = 0  # claims so far (app-level counter: broker delivery limits miss consumer timeouts)
    max_attempts: int = 3
    retries: int = 0  # operator re-queues of a failed job
    # Runs that ended in an unexpected exception (a bug, not bad input): retried, then failed as
    # an internal error; summed by the unimedvl_job_crashes metric. Migration 0004_job_crashes.
    crashes: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0, server_default="0"))
    lease_seconds: float = 60.0  # the worker renews lease_until every lease_seconds / 3
    lease_until: datetime | None = None
    claim_token: str | None = Field(default=None, max_length=32)
    worker: str | None = Field(default=None, max_length=255)  # host:pid of the last claim
    published_at: datetime | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # readable reason, no traceback
    summary: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    model_info: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class JobOutput(SQLModel, table=True):
    """One DICOM object a job produced (stored) and the outbox rows that deliver it."""

    __tablename__ = "job_output"
    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid", name="uq_job_output_sop"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    sop_instance_uid: str = Field(max_length=64)
    sop_class_uid: str = Field(max_length=64)
    series_instance_uid: str | None = Field(default=None, max_length=64)
    source_series_uid: str | None = Field(default=None, max_length=64)
    kind: str = Field(max_length=16)  # sr | seg | tid1500 | sc | derived
    relpath: str = Field(max_length=512)
    sha256: str = Field(max_length=64)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    outbox_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime


class StudyPlanRecord(SQLModel, table=True):
    """What routing decided for one study revision, including series no rule matched."""

    __tablename__ = "study_plan"
    __table_args__ = (UniqueConstraint("study_instance_uid", "revision", name="uq_study_plan_revision"),)

    id: int | None = Field(default=None, primary_key=True)
    study_instance_uid: str = Field(max_length=64)
    revision: int
    model_version: str = Field(max_length=128)
    planned_at: datetime
    tasks_planned: int = 0
    job_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    series_uids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # SeriesInstanceUIDs that matched no rule: recorded (and logged) instead of silently dropped.
    unmatched_series: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
