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


class JobCollector(Collector):
    """`unimedvl_jobs{state}` (gauge) and `unimedvl_job_crashes` (counter: runs that ended in an
    unexpected exception, each retried or failed as an internal error)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

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
