"""Batch tables: one row per batch, one per item (a study), one per (item, series, task) result.

An item is a row before it is a message: the driver inserts every item (state "pending")
before publishing any, workers claim items with one conditional UPDATE, and an item's
results are inserted in the same transaction that marks it done (and only while the worker
still holds its claim), so a killed process never leaves a result twice. Times are aware UTC.
Migration: ``dicom_node/migrations/versions/0005_batch.py``; keep both in step.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

PENDING = "pending"  # in the DB, not published
QUEUED = "queued"  # published to the batch queue
FETCHING = "fetching"  # a worker holds it and is retrieving the study
RUNNING = "running"  # fetched; the model runs
DONE = "done"
FAILED = "failed"
SKIPPED = "skipped"  # nothing to run (no rule matched, burned-in annotation, ...), with the reason
ITEM_STATES = (PENDING, QUEUED, FETCHING, RUNNING, DONE, FAILED, SKIPPED)
ACTIVE = (PENDING, QUEUED, FETCHING, RUNNING)
FINISHED = (DONE, FAILED, SKIPPED)


class BatchRun(SQLModel, table=True):
    __tablename__ = "batch_run"

    id: int | None = Field(default=None, primary_key=True)
    # sha256 of (source, query, out dir, tasks/rules, de-identification, model): the same command resumes.
    key: str = Field(max_length=64, unique=True)
    source: str = Field(sa_column=Column(Text, nullable=False))  # as given (folder, dimse://, http(s)://)
    out_dir: str = Field(sa_column=Column(Text, nullable=False))
    # Everything a worker on another host needs: rules, de-identification options and secret, fetch limits.
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    model_version: str = Field(max_length=128)
    state: str = Field(default="enumerating", max_length=16)  # enumerating | running | finished
    items_total: int = 0
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class BatchItem(SQLModel, table=True):
    __tablename__ = "batch_item"
    __table_args__ = (
        UniqueConstraint("batch_id", "study_instance_uid", name="uq_batch_item_study"),
        Index("ix_batch_item_state", "batch_id", "state"),
    )

    id: int | None = Field(default=None, primary_key=True)
    batch_id: int = Field(foreign_key="batch_run.id", index=True)
    # sha256 of (batch key, study): the same study in the same batch is one item, whatever restarts.
    idempotency_key: str = Field(max_length=64, unique=True)
    study_instance_uid: str = Field(max_length=64)  # as in the source (stays in the hospital's DB)
    patient_id: str | None = Field(default=None, max_length=64)  # for the mapping key, only if asked for
    # How to fetch it: folder sources list file paths (relative to the source root); PACS sources nothing.
    locator: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = Field(default=PENDING, max_length=16)
    attempts: int = 0
    max_attempts: int = 3
    lease_seconds: float = 60.0
    lease_until: datetime | None = None
    claim_token: str | None = Field(default=None, max_length=32)
    worker: str | None = Field(default=None, max_length=255)
    published_at: datetime | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # readable reason
    timings: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # Attempts that ended in an unexpected exception (a bug, not bad input), each retried or failed;
    # summed by the unimedvl_batch_item_crashes metric. Migration 0007_batch_crashes.
    crashes: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0, server_default="0"))


class BatchResult(SQLModel, table=True):
    """One row of the results table: (item, series, task), pseudonymous UIDs when de-identified."""

    __tablename__ = "batch_result"
    __table_args__ = (UniqueConstraint("item_id", "series_instance_uid", "task", "rule", name="uq_batch_result"),)

    id: int | None = Field(default=None, primary_key=True)
    batch_id: int = Field(foreign_key="batch_run.id", index=True)
    item_id: int = Field(foreign_key="batch_item.id", index=True)
    study_instance_uid: str = Field(max_length=64)
    series_instance_uid: str = Field(max_length=64)
    modality: str | None = Field(default=None, max_length=16)
    rule: str = Field(max_length=128)
    task: str = Field(max_length=32)
    state: str = Field(max_length=16)  # done | failed | skipped
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    text: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # report or answers
    qa: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    segmentation: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    output_sop_instance_uids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    output_paths: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    model_name: str | None = Field(default=None, max_length=128)
    model_version: str | None = Field(default=None, max_length=128)
    checkpoint_sha256: str | None = Field(default=None, max_length=64)
    timings: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime
