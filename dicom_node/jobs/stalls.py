"""Stall signals of the job pipeline, read from the job table: what /readyz, `unimedvl status`
and the metrics report when work silently stops moving.

- oldest waiting job: a planned/queued job older than `jobs.stall_queued_seconds` (no worker
  consumes its queue, or its message is lost: the sweeper re-publishes, this tells a person);
- worker heartbeat: a running job's worker renews its lease every lease/3 s, so a lease renewed
  longer ago than a lease means its worker stopped (killed, hung, host lost);
- overrun: a job running longer than `jobs.time_limit_seconds` (Celery should have killed it).
Idle workers write nothing to the database, so an idle dead worker shows up as the first signal
once a job waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node.jobs.models import PLANNED, QUEUED, RUNNING, Job
from dicom_node.jobs.settings import JobSettings, as_utc, job_settings, utcnow


@dataclass(frozen=True)
class StallFigures:
    """Ages in seconds (None: nothing of that kind) and counts, at `now`."""

    oldest_waiting_age: float | None  # oldest planned/queued job, from its creation
    heartbeat_age: float | None  # longest time since a running job's lease was renewed
    overrun: int  # running jobs past time_limit_seconds
    stale_heartbeats: int  # running jobs whose lease was last renewed over a lease ago


def stall_figures(engine: Engine, jobs: JobSettings | None = None, *, now: datetime | None = None) -> StallFigures:
    jobs = jobs or JobSettings()
    now = now or utcnow()
    with Session(engine) as s:
        oldest = s.exec(select(func.min(Job.created_at)).where(col(Job.state).in_([PLANNED, QUEUED]))).one()
        running = s.exec(select(Job.lease_until, Job.lease_seconds, Job.started_at).where(Job.state == RUNNING)).all()
    ages = []
    overrun = stale = 0
    for lease_until, lease_seconds, started_at in running:
        lease_until, started_at = as_utc(lease_until), as_utc(started_at)
        if lease_until is not None:
            age = (now - (lease_until - timedelta(seconds=lease_seconds))).total_seconds()
            ages.append(max(age, 0.0))
            stale += age > lease_seconds
        if started_at is not None and (now - started_at).total_seconds() > jobs.time_limit_seconds:
            overrun += 1
    oldest = as_utc(oldest)
    return StallFigures(
        oldest_waiting_age=(now - oldest).total_seconds() if oldest is not None else None,
        heartbeat_age=max(ages) if ages else None,
        overrun=overrun,
        stale_heartbeats=stale,
    )


def stalls(engine: Engine, settings: Any = None, *, now: datetime | None = None) -> list[str]:
    """Reasons (one readable sentence each, no patient data) the job pipeline is stalled; [] when none.

    For /readyz (degraded while non-empty), `unimedvl status` and the console."""
    jobs = job_settings(settings)
    f = stall_figures(engine, jobs, now=now)
    reasons = []
    if f.oldest_waiting_age is not None and f.oldest_waiting_age > jobs.stall_queued_seconds:
        reasons.append(
            f"the oldest waiting job has waited {f.oldest_waiting_age:.0f} s "
            f"(over {jobs.stall_queued_seconds:.0f} s): no worker is taking jobs"
        )
    if f.stale_heartbeats:
        reasons.append(
            f"{f.stale_heartbeats} running job(s) whose worker stopped renewing its lease "
            f"{f.heartbeat_age:.0f} s ago (killed or hung); the sweeper re-queues them"
        )
    if f.overrun:
        reasons.append(f"{f.overrun} job(s) running past the time limit of {jobs.time_limit_seconds:.0f} s")
    return reasons
