"""Readiness that tells the truth: what /readyz, the dashboard and the Prometheus gauges report.

Degraded (HTTP 503 on /readyz), each with a reason an operator can act on, when:
- the database or the broker cannot be reached;
- storage free space is under `storage.min_free_bytes` (C-STOREs are refused with 0xA700);
- a destination has had undelivered outputs with errors (refused connection, failure status)
  for longer than `health.destination_failing_seconds` without a delivery since, or delivery
  rows ended `failed` within `health.failed_window_seconds`;
- jobs wait and no worker has claimed, finished or renewed the lease of (heartbeated on) any
  job for `health.worker_silence_seconds` (job leases are the workers' heartbeat: a running
  job's lease is renewed every lease/3 seconds, see dicom_node/jobs/runner.py);
- the oldest planned/queued job is older than `health.queued_age_seconds`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node.config import Settings
from dicom_node.export.models import DONE, FAILED, PENDING, SENDING, OutboxRow
from dicom_node.jobs.models import PLANNED, QUEUED, Job
from dicom_node.storage import Storage

log = logging.getLogger("dicom_node.console.health")
CHECKS = ("database", "broker", "storage", "destinations", "workers", "queue")


@dataclass
class Readiness:
    """`ok` is False when any check fails; `reasons` are sentences; `checks` maps check -> ok."""

    ok: bool = True
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(CHECKS, True))
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)
    storage_free_bytes: int | None = None
    waiting_jobs: int = 0
    oldest_waiting_age_s: float | None = None
    worker_activity_age_s: float | None = None

    def fail(self, check: str, reason: str) -> None:
        self.ok = False
        self.checks[check] = False
        self.reasons.append(reason)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "degraded",
            "reasons": self.reasons,
            "checks": {k: "ok" if v else "failing" for k, v in self.checks.items()},
            "destinations": self.destinations,
            "storage_free_bytes": self.storage_free_bytes,
            "waiting_jobs": self.waiting_jobs,
            "oldest_waiting_job_age_seconds": self.oldest_waiting_age_s,
            "worker_activity_age_seconds": self.worker_activity_age_s,
        }


def _aware(dt: datetime | None) -> datetime | None:
    return None if dt is None else (dt if dt.tzinfo else dt.replace(tzinfo=UTC))


def _age(now: datetime, dt: datetime | None) -> float | None:
    a = _aware(dt)
    return None if a is None else max((now - a).total_seconds(), 0.0)


def broker_reachable(url: str, timeout: float) -> str | None:
    """None when the broker accepts a connection within `timeout` seconds, else the error's name."""
    import kombu

    try:
        with kombu.Connection(url, connect_timeout=timeout, transport_options={"max_retries": 0}) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # any failure means "not reachable"; the type says which
        return type(exc).__name__
    return None


class ReadinessChecker:
    """Runs every check against one settings object and database engine."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine

    def check(self, now: datetime | None = None) -> Readiness:
        now = now or datetime.now(UTC)
        r = Readiness()
        db_ok = self._database(r)
        err = broker_reachable(self.settings.broker.url, self.settings.health.broker_timeout_seconds)
        if err:
            r.fail("broker", f"the broker cannot be reached ({err}): jobs cannot be handed to workers")
        self._storage(r)
        if db_ok:
            try:
                self._destinations(r, now)
                self._jobs(r, now)
            except Exception as exc:  # a half-migrated or locked DB: say so rather than 500
                log.warning("readiness query failed: %s", type(exc).__name__)
                r.fail("database", f"the database could not be queried ({type(exc).__name__})")
        return r

    def _database(self, r: Readiness) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:
            r.fail("database", f"the database cannot be reached ({type(exc).__name__})")
            return False

    def _storage(self, r: Readiness) -> None:
        floor = self.settings.storage.min_free_bytes
        try:
            free = Storage(self.settings.storage.path, floor).free_bytes()
        except OSError as exc:
            r.fail("storage", f"storage cannot be read ({type(exc).__name__})")
            return
        r.storage_free_bytes = free
        if free < floor:
            r.fail("storage", f"storage has {free / 2**30:.2f} GiB free, under the floor of {floor / 2**30:.2f} GiB")

    def _destinations(self, r: Readiness, now: datetime) -> None:
        h = self.settings.health
        names = [d.name for d in self.settings.destinations]
        with Session(self.engine) as s:
            erroring = s.exec(
                select(OutboxRow.destination, func.min(OutboxRow.created_at), func.count())
                .where(col(OutboxRow.state).in_([PENDING, SENDING]), OutboxRow.attempts > 0)
                .where(col(OutboxRow.last_error).is_not(None))
                .group_by(OutboxRow.destination)
            ).all()
            last_done = dict(
                s.exec(
                    select(OutboxRow.destination, func.max(OutboxRow.done_at))
                    .where(OutboxRow.state == DONE)
                    .group_by(OutboxRow.destination)
                ).all()
            )
            since = now - timedelta(seconds=h.failed_window_seconds)
            failed = dict(
                s.exec(
                    select(OutboxRow.destination, func.count())
                    .where(OutboxRow.state == FAILED, OutboxRow.updated_at >= since)
                    .group_by(OutboxRow.destination)
                ).all()
            )
            errors: dict[str, str | None] = {}
            for dest, *_ in erroring:
                errors[dest] = s.exec(
                    select(OutboxRow.last_error)
                    .where(OutboxRow.destination == dest, col(OutboxRow.last_error).is_not(None))
                    .order_by(col(OutboxRow.updated_at).desc())
                ).first()
        for dest in sorted({*names, *(e[0] for e in erroring), *failed}):
            info: dict[str, Any] = {"state": "ok", "failing_seconds": 0.0, "erroring": 0, "failed_recently": 0}
            delivered = _aware(last_done.get(dest))
            info["last_delivered_at"] = delivered.isoformat() if delivered else None
            r.destinations[dest] = info
            row = next((e for e in erroring if e[0] == dest), None)
            if row is not None:
                start = max(x for x in (_aware(row[1]), _aware(last_done.get(dest))) if x is not None)
                info["failing_seconds"] = max((now - start).total_seconds(), 0.0)
                info["erroring"] = int(row[2])
                info["last_error"] = errors.get(dest)
                if info["failing_seconds"] > h.destination_failing_seconds:
                    info["state"] = "failing"
                    r.fail(
                        "destinations",
                        f"destination {dest}: {row[2]} output(s) undelivered for {info['failing_seconds']:.0f} s"
                        f" (last error: {errors.get(dest) or 'unknown'})",
                    )
            n_failed = int(failed.get(dest, 0))
            info["failed_recently"] = n_failed
            if n_failed:
                info["state"] = "failing"
                r.fail(
                    "destinations",
                    f"destination {dest}: {n_failed} delivery(ies) failed in the last "
                    f"{h.failed_window_seconds / 60:.0f} min (see Deliveries, retry when fixed)",
                )

    def _jobs(self, r: Readiness, now: datetime) -> None:
        h = self.settings.health
        with Session(self.engine) as s:
            n_wait, oldest = s.exec(
                select(func.count(), func.min(Job.created_at)).where(col(Job.state).in_([PLANNED, QUEUED]))
            ).one()
            # Worker activity: a claim (started_at), a result (finished_at) or a lease renewal
            # (updated_at of a running job) is a heartbeat.
            started, finished = s.exec(select(func.max(Job.started_at), func.max(Job.finished_at))).one()
            renewed = s.exec(select(func.max(Job.updated_at)).where(Job.state == "running")).one()
        r.waiting_jobs = int(n_wait)
        r.oldest_waiting_age_s = _age(now, oldest)
        beats = [a for a in (_aware(started), _aware(finished), _aware(renewed)) if a is not None]
        r.worker_activity_age_s = _age(now, max(beats)) if beats else None
        if r.oldest_waiting_age_s is not None and r.oldest_waiting_age_s > h.queued_age_seconds:
            r.fail(
                "queue",
                f"the oldest of {n_wait} waiting job(s) has waited {r.oldest_waiting_age_s:.0f} s"
                f" (threshold {h.queued_age_seconds:.0f} s)",
            )
        silent = r.worker_activity_age_s is None or r.worker_activity_age_s > h.worker_silence_seconds
        if n_wait and silent and (r.oldest_waiting_age_s or 0) > h.worker_silence_seconds:
            last = "never" if r.worker_activity_age_s is None else f"{r.worker_activity_age_s:.0f} s ago"
            r.fail(
                "workers",
                f"no worker has heartbeated (last job activity {last}) while {n_wait} job(s) wait:"
                " start `unimedvl worker` or check the broker",
            )
        # Running jobs whose worker stopped renewing its lease, or past the time limit
        # (dicom_node.jobs.stalls; the waiting-job age is the "queue" check above).
        from dicom_node.jobs.stalls import stalls

        for reason in stalls(self.engine, self.settings):
            if not reason.startswith("the oldest waiting job"):
                r.fail("workers", reason)


class ReadinessCollector(Collector):
    """The readiness checks as Prometheus gauges (evaluated at scrape time)."""

    def __init__(self, checker: ReadinessChecker) -> None:
        self.checker = checker

    def describe(self) -> list[Any]:
        return []  # no checks (broker connection) at registration time, only at scrape time

    def collect(self) -> Iterator[GaugeMetricFamily]:
        r = self.checker.check()
        yield GaugeMetricFamily("unimedvl_ready", "1 when /readyz reports ok, 0 when degraded", value=int(r.ok))
        g = GaugeMetricFamily("unimedvl_ready_check", "1 when the readiness check passes", labels=["check"])
        for name, ok in r.checks.items():
            g.add_metric([name], int(ok))
        yield g
        yield GaugeMetricFamily("unimedvl_database_up", "1 when the database answers", value=int(r.checks["database"]))
        yield GaugeMetricFamily(
            "unimedvl_broker_up", "1 when the broker accepts a connection", value=int(r.checks["broker"])
        )
        if r.storage_free_bytes is not None:
            yield GaugeMetricFamily(
                "unimedvl_storage_free_bytes", "Free bytes on the storage volume", value=r.storage_free_bytes
            )
        fs = GaugeMetricFamily(
            "unimedvl_destination_failing_seconds",
            "Seconds a destination has had undelivered outputs with errors and no delivery (0 = fine)",
            labels=["destination"],
        )
        fr = GaugeMetricFamily(
            "unimedvl_destination_failed_recent",
            "Deliveries that ended failed within health.failed_window_seconds",
            labels=["destination"],
        )
        for dest, info in r.destinations.items():
            fs.add_metric([dest], info["failing_seconds"])
            fr.add_metric([dest], info["failed_recently"])
        yield fs
        yield fr
        yield GaugeMetricFamily(
            "unimedvl_jobs_waiting", "Jobs planned or queued, not yet claimed", value=r.waiting_jobs
        )
        yield GaugeMetricFamily(
            "unimedvl_oldest_waiting_job_age_seconds",
            "Age of the oldest planned/queued job (0 when none wait)",
            value=r.oldest_waiting_age_s or 0.0,
        )
        if r.worker_activity_age_s is not None:
            yield GaugeMetricFamily(
                "unimedvl_worker_last_heartbeat_age_seconds",
                "Seconds since any worker claimed, finished or renewed the lease of a job",
                value=r.worker_activity_age_s,
            )


class SafeCollector(Collector):
    """Wraps a database-backed collector so a database outage leaves /metrics answering (with
    `unimedvl_database_up 0`) instead of failing the whole scrape."""

    def __init__(self, inner: Collector) -> None:
        self.inner = inner

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        try:
            yield from list(self.inner.collect())
        except Exception as exc:
            log.warning("metrics of %s unavailable: %s", type(self.inner).__name__, type(exc).__name__)
