"""Prometheus metrics of model jobs, read from the job table at scrape time (workers run in
other processes, so in-process counters would miss them; the table survives restarts)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from dicom_node.jobs.models import STATES, Job
from dicom_node.jobs.settings import JobSettings
from dicom_node.jobs.stalls import stall_figures


class JobCollector(Collector):
    """`unimedvl_jobs{state}` (gauge), `unimedvl_job_crashes` (counter: runs that ended in an
    unexpected exception, each retried or failed as an internal error) and the stall gauges."""

    def __init__(self, engine: Engine, jobs: JobSettings | None = None) -> None:
        self.engine = engine
        self.jobs = jobs

    def collect(self) -> Iterator[Any]:
        with Session(self.engine) as s:
            per_state = dict(s.exec(select(Job.state, func.count()).group_by(Job.state)).all())
            crashes = s.exec(select(func.coalesce(func.sum(Job.crashes), 0))).one()
        g = GaugeMetricFamily("unimedvl_jobs", "Model jobs by state", labels=["state"])
        for state in STATES:
            g.add_metric([state], per_state.get(state, 0))
        yield g
        yield CounterMetricFamily(
            "unimedvl_job_crashes",
            "Job runs that ended in an unexpected exception (bugs, not bad input)",
            value=crashes,
        )
        # Stall signals (dicom_node.jobs.stalls); ages are 0 when nothing is waiting / running.
        f = stall_figures(self.engine, self.jobs)
        yield GaugeMetricFamily(
            "unimedvl_job_oldest_waiting_age_seconds",
            "Age of the oldest planned or queued job",
            value=f.oldest_waiting_age or 0.0,
        )
        yield GaugeMetricFamily(
            "unimedvl_worker_heartbeat_age_seconds",
            "Longest time since a running job's worker renewed its lease",
            value=f.heartbeat_age or 0.0,
        )
        yield GaugeMetricFamily(
            "unimedvl_jobs_stale_heartbeat", "Running jobs whose worker stopped renewing", value=f.stale_heartbeats
        )
        yield GaugeMetricFamily("unimedvl_jobs_overrun", "Running jobs past jobs.time_limit_seconds", value=f.overrun)
