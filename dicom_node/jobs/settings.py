"""Job settings ([jobs] section) and the small helpers every job module shares."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobSettings(BaseModel):
    """Timing and retry policy of model jobs (a `[jobs]` table in the config)."""

    model_config = ConfigDict(extra="forbid")
    max_attempts: int = Field(3, ge=1, le=100)  # claims per job before it ends failed
    lease_seconds: float = Field(120.0, gt=0)  # a running job's worker renews its lease every lease/3
    sweep_interval_seconds: float = Field(5.0, gt=0)
    planned_grace_seconds: float = Field(5.0, ge=0)  # leave fresh "planned" jobs to the planner's own publish
    # A job published this long ago that no worker has claimed is published again. The embedded
    # transport hides a taken message, and a RabbitMQ queue can be purged or lost: the DB decides.
    queued_timeout_seconds: float = Field(3600.0, gt=0)
    # Celery hard time limit of one run (the pool child is killed; the lease then expires and the
    # job is re-queued or, past max_attempts, failed). Below RabbitMQ's consumer timeout (4 h).
    time_limit_seconds: float = Field(3 * 3600.0, gt=0)
    # A planned/queued job older than this is reported as a stall (status, metrics, /readyz).
    stall_queued_seconds: float = Field(900.0, gt=0)


def job_settings(settings: Any) -> JobSettings:
    """The `[jobs]` section when the Settings model has one, else the defaults."""
    value = getattr(settings, "jobs", None)
    if isinstance(value, JobSettings):
        return value
    if isinstance(value, BaseModel):
        return JobSettings.model_validate(value.model_dump())
    if isinstance(value, dict):
        return JobSettings.model_validate(value)
    return JobSettings()


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(t: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    if t is None:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def model_version(model_settings: Any) -> str:
    """A cheap, stable name for the configured model, part of every job's idempotency key.

    "tiny" for the demo model; for a checkpoint folder its name plus a digest of the weight and
    config files' names, sizes and modification times (hashing 30 GB of weights per plan would
    be too slow), so swapping the checkpoint gives new keys and re-planning runs the new model.
    """
    path = str(getattr(model_settings, "path", model_settings))
    if path == "tiny":
        return "tiny"
    folder = Path(path)
    digest = hashlib.sha256()
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix in (".json", ".safetensors", ".model", ".txt"):
                st = p.stat()
                digest.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{folder.name[:100]}@{digest.hexdigest()[:12]}"


def one_line(text: str, limit: int = 1000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
