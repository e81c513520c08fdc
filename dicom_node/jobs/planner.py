"""Planning: a completed study revision -> routing rules -> job rows -> broker messages.

Order matters: job rows are inserted idempotently and COMMITTED, and only then published
(one message per job id on the task kind's queue), then marked "queued". A crash between
commit and publish leaves "planned" rows that the sweeper publishes; the sweeper also
re-publishes jobs no worker took within `queued_timeout_seconds` and jobs whose worker
stopped renewing its lease (killed, OOM, lost host). Attempts are counted in the DB at claim
time; a job past `max_attempts` ends "failed" with the reason. A duplicate message is
harmless: a worker claims a job with one conditional UPDATE, so only one run holds it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node import leases
from dicom_node.jobs.models import DONE, FAILED, PLANNED, QUEUED, RUNNING, Job, StudyPlanRecord
from dicom_node.jobs.settings import JobSettings, as_utc, model_version, utcnow
from dicom_node.models import Instance, Series, Study
from dicom_node.periodic import Periodic
from dicom_node.routing import Rule, SeriesInfo, plan_study

log = logging.getLogger("dicom_node.jobs.planner")

TASK_NAME = "unimedvl.run_job"


class Publisher:
    """Sends "run job N" messages on the Celery broker (embedded SQLite or RabbitMQ)."""

    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        from dicom_node.jobs.celery_app import configure, resolve_broker_url

        self.broker_url = resolve_broker_url(broker_url)
        self.app = configure(Celery("unimedvl-planner"), self.broker_url)
        self._lock = threading.Lock()
        self._dead_letter_declared = False
        self._broker_db: Engine | None = None

    def publish(self, job_id: int, queue: str) -> None:
        """ "Run job N" on `queue`; returns once the broker has it."""
        self.send(TASK_NAME, [job_id], queue)

    def send(self, task_name: str, args: list[Any], queue: str, *, max_retries: int = 2) -> None:
        """One task message (the jobs' and the research batch's). Publisher confirms on RabbitMQ
        (confirm_publish): returning means the broker has it; connection errors are retried."""
        with self._lock:
            if not self._dead_letter_declared:  # before any message can be dead-lettered
                from dicom_node.jobs.celery_app import declare_dead_letter_queue

                declare_dead_letter_queue(self.app)
                self._dead_letter_declared = True
            self.app.send_task(
                task_name,
                args=args,
                queue=queue,
                retry=True,
                retry_policy={
                    "max_retries": max_retries,
                    "interval_start": 0.2,
                    "interval_step": 0.5,
                    "interval_max": 1.0 if max_retries <= 2 else 2.0,
                },
            )

    def ready_counts(self, queues: Sequence[str]) -> dict[str, int] | None:
        """The broker's view: messages waiting (not delivered to any consumer) per queue.

        Embedded: visible rows of kombu's `kombu_message` table; RabbitMQ: a passive
        queue.declare's message_count (ready messages; unacked ones are not counted). A queue
        that does not exist has 0. None when the broker cannot be asked right now.
        """
        from dicom_node.jobs.celery_app import is_amqp

        try:
            if is_amqp(self.broker_url):
                return self._amqp_ready(queues)
            return self._sql_ready(queues)
        except Exception as exc:  # the sweeper then decides nothing from the broker this round
            log.warning("cannot read the broker's queue depths (%s)", type(exc).__name__)
            return None

    def _sql_ready(self, queues: Sequence[str]) -> dict[str, int]:
        from sqlalchemy import create_engine, inspect, text

        url = self.broker_url.split("+", 1)[1]  # sqla+sqlite:///... -> sqlite:///...
        if self._broker_db is None:
            self._broker_db = create_engine(url)
        counts = dict.fromkeys(queues, 0)
        with self._broker_db.connect() as conn:
            if not inspect(conn).has_table("kombu_message"):
                return counts
            rows = conn.execute(
                text(
                    "SELECT q.name, COUNT(m.id) FROM kombu_queue q JOIN kombu_message m ON m.queue_id = q.id "
                    "WHERE m.visible GROUP BY q.name"
                )
            ).all()
        for name, n in rows:
            if name in counts:
                counts[name] = int(n)
        return counts

    def _amqp_ready(self, queues: Sequence[str]) -> dict[str, int]:
        from amqp.exceptions import NotFound

        counts = dict.fromkeys(queues, 0)
        with self.app.connection_for_read() as conn:
            for q in queues:
                ch = conn.channel()
                try:
                    counts[q] = int(ch.queue_declare(queue=q, passive=True).message_count)
                except NotFound:
                    pass  # never declared: nothing waits in it
                finally:
                    try:
                        ch.close()
                    except Exception:
                        pass
        return counts

    def close(self) -> None:
        self.app.close()
        if self._broker_db is not None:
            self._broker_db.dispose()


@dataclass
class PlanResult:
    study_instance_uid: str
    revision: int
    job_ids: list[int] = field(default_factory=list)
    new_job_ids: list[int] = field(default_factory=list)
    unmatched_series: list[str] = field(default_factory=list)
    published: int = 0


@dataclass
class SweepResult:
    lease_expired: int = 0
    stale_queued: int = 0
    undelivered: int = 0  # queued, delivered to a consumer that died (nothing waits in the queue)
    gave_up: int = 0
    published: int = 0


def _insert(engine: Engine) -> Any:
    return pg_insert if engine.dialect.name == "postgresql" else sqlite_insert


def series_infos(
    session: Session, study_uid: str, revision: int, series_uids: Sequence[str] | None
) -> list[SeriesInfo]:
    """What routing matches on, from the index: tags of each series and the association it came on."""
    study = session.exec(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        return []
    query = select(Series).where(Series.study_pk == study.id)
    if series_uids is not None:
        query = query.where(col(Series.series_instance_uid).in_(list(series_uids)))
    infos = []
    for s in session.exec(query.order_by(col(Series.series_number), col(Series.series_instance_uid))):
        sop_classes = session.exec(
            select(Instance.sop_class_uid).where(Instance.series_pk == s.id).distinct().order_by(Instance.sop_class_uid)
        ).all()
        # The association of this revision's latest instance (a series can arrive from two senders).
        latest = session.exec(
            select(Instance.calling_ae, Instance.called_ae)
            .where(Instance.series_pk == s.id)
            .order_by((Instance.revision == revision).desc(), col(Instance.received_at).desc())
            .limit(1)
        ).first()
        infos.append(
            SeriesInfo(
                series_instance_uid=s.series_instance_uid,
                modality=s.modality or "",
                body_part=s.body_part_examined or "",
                series_description=s.series_description or "",
                sop_classes=tuple(sop_classes),
                calling_ae=latest[0] if latest else "",
                called_ae=latest[1] if latest else "",
            )
        )
    return infos


class Planner:
    """Turns completion events into jobs and keeps every unfinished job moving (the sweeper)."""

    def __init__(
        self,
        engine: Engine,
        rules: Sequence[Rule],
        publisher: Publisher | None,
        *,
        model: Any = "tiny",
        jobs: JobSettings | None = None,
    ) -> None:
        from dicom_node.jobs.celery_app import TASK_QUEUES

        self.engine = engine
        self.rules = list(rules)
        self.publisher = publisher
        self.jobs = jobs or JobSettings()
        self.model_version = model_version(model)
        self.queues = TASK_QUEUES
        self._loop = Periodic("job-sweeper", self.sweep, lambda: self.jobs.sweep_interval_seconds, log)

    @classmethod
    def from_settings(cls, settings: Any, engine: Engine, publisher: Publisher | None = None) -> Planner:
        from dicom_node.jobs.settings import job_settings
        from dicom_node.routing import parse_rules

        return cls(
            engine,
            parse_rules(settings.rules),
            publisher if publisher is not None else Publisher(settings.broker.url),
            model=settings.model,
            jobs=job_settings(settings),
        )

    # ------------------------------------------------------------------ planning

    def on_study_complete(self, event: Any) -> None:
        """CompletionMonitor subscriber: raises only if the plan could not be committed."""
        self.plan_revision(event.study_instance_uid, event.revision, getattr(event, "series_uids", None))

    def plan_revision(
        self, study_uid: str, revision: int, series_uids: Sequence[str] | None = None, *, now: datetime | None = None
    ) -> PlanResult:
        now = now or utcnow()
        result = PlanResult(study_uid, revision)
        with Session(self.engine, expire_on_commit=False) as s:
            infos = series_infos(s, study_uid, revision, series_uids)
            plan = plan_study(self.rules, infos)
            keys: list[str] = []
            for task in plan.tasks:
                key = task.idempotency_key(study_uid, revision, self.model_version)
                keys.append(key)
                values = {
                    "idempotency_key": key,
                    "study_instance_uid": study_uid,
                    "revision": revision,
                    "rule": task.rule,
                    "kind": task.task.kind,
                    "params": task.task.parameters(),
                    "series_uids": sorted(task.series),
                    "model_version": self.model_version,
                    "queue": self.queues[task.task.kind],
                    "state": PLANNED,
                    "attempts": 0,
                    "max_attempts": self.jobs.max_attempts,
                    "retries": 0,
                    "lease_seconds": self.jobs.lease_seconds,
                    "created_at": now,
                    "updated_at": now,
                }
                stmt = _insert(self.engine)(Job.__table__).values(values)  # type: ignore[attr-defined]
                s.execute(stmt.on_conflict_do_nothing(index_elements=["idempotency_key"]))
            jobs = (
                s.exec(select(Job).where(col(Job.idempotency_key).in_(keys)).order_by(col(Job.id))).all()
                if keys
                else []
            )
            result.job_ids = [j.id for j in jobs if j.id is not None]
            result.new_job_ids = [j.id for j in jobs if j.id is not None and as_utc(j.created_at) == now]
            result.unmatched_series = list(plan.unmatched_series)
            record = s.exec(
                select(StudyPlanRecord).where(
                    StudyPlanRecord.study_instance_uid == study_uid, StudyPlanRecord.revision == revision
                )
            ).first()
            if record is None:
                record = StudyPlanRecord(
                    study_instance_uid=study_uid, revision=revision, model_version="", planned_at=now
                )
            record.model_version = self.model_version
            record.planned_at = now
            record.tasks_planned = len(plan.tasks)
            record.job_ids = result.job_ids
            record.series_uids = [i.series_instance_uid for i in infos]
            record.unmatched_series = result.unmatched_series
            if not infos:
                record.note = "no series of this revision are in the index"
            elif not plan.tasks:
                record.note = "no routing rule matched any series of this study: nothing to run"
            else:
                record.note = None
            s.add(record)
            s.commit()  # the jobs exist before any message names them
        if result.unmatched_series:
            # Counts only: UIDs are in the study_plan row (no PHI in logs).
            log.warning(
                "study revision %s: %d series matched no rule (recorded in study_plan)",
                revision,
                len(result.unmatched_series),
            )
        log.info("planned study revision %s: %d job(s), %d new", revision, len(result.job_ids), len(result.new_job_ids))
        result.published = self.publish_planned(result.job_ids, now=now)
        return result

    # ------------------------------------------------------------------ publishing

    def publish_planned(
        self, job_ids: Sequence[int] | None = None, *, older_than: datetime | None = None, now: datetime | None = None
    ) -> int:
        """Publish "planned" jobs (all, `job_ids`, or those last updated before `older_than`) -> "queued"."""
        if self.publisher is None:
            return 0
        with Session(self.engine) as s:
            query = select(Job.id, Job.queue).where(Job.state == PLANNED)
            if job_ids is not None:
                if not job_ids:
                    return 0
                query = query.where(col(Job.id).in_(list(job_ids)))
            if older_than is not None:
                query = query.where(Job.updated_at < older_than)
            todo = s.exec(query.order_by(col(Job.id))).all()
        published = 0
        for job_id, queue in todo:
            try:
                self.publisher.publish(job_id, queue)
            except Exception as exc:  # broker down: the row stays "planned" and the sweeper tries again
                log.warning("could not publish job %s (%s: %s); will retry", job_id, type(exc).__name__, exc)
                break
            t = utcnow()
            with Session(self.engine) as s:
                s.execute(
                    update(Job)
                    .where(col(Job.id) == job_id, col(Job.state) == PLANNED)
                    .values(state=QUEUED, published_at=t, updated_at=t)
                )
                s.commit()
            published += 1
        return published

    # ------------------------------------------------------------------ sweeping

    def sweep(self, now: datetime | None = None) -> SweepResult:
        """One pass: recover expired leases and stale queued jobs, give up past max_attempts, publish."""
        now = now or utcnow()
        r = SweepResult()
        with Session(self.engine) as s:
            expired = s.exec(select(Job).where(Job.state == RUNNING, leases.expired(Job, now))).all()
            for job in expired:
                exhausted = job.attempts >= job.max_attempts
                values: dict[str, Any] = {"updated_at": now, **leases.CLEARED}
                if exhausted:
                    values.update(
                        state=FAILED,
                        finished_at=now,
                        error=(
                            f"the worker stopped during the job (killed, out of memory or lost) on each of "
                            f"{job.attempts} attempt(s); last worker {job.worker or 'unknown'}"
                        ),
                    )
                else:
                    values.update(state=PLANNED)
                n = s.execute(
                    update(Job)
                    .where(col(Job.id) == job.id, col(Job.state) == RUNNING, leases.held(Job, job.claim_token or ""))
                    .values(**values)
                ).rowcount  # type: ignore[attr-defined]
                if n:
                    if exhausted:
                        r.gave_up += 1
                        log.error("job %s failed: worker lost on %d attempt(s)", job.id, job.attempts)
                    else:
                        r.lease_expired += 1
                        log.warning("job %s: lease expired (worker %s stopped); re-queueing", job.id, job.worker)
            stale_before = now - timedelta(seconds=self.jobs.queued_timeout_seconds)
            r.stale_queued = (
                s.execute(
                    update(Job)
                    .where(col(Job.state) == QUEUED, col(Job.published_at) < stale_before)
                    .values(state=PLANNED, updated_at=now)
                ).rowcount  # type: ignore[attr-defined]
                or 0
            )
            s.commit()
        r.undelivered = self._requeue_orphaned_messages(now)
        if r.stale_queued:
            log.warning(
                "%d job(s) queued longer than %.0f s without a worker: publishing again",
                r.stale_queued,
                self.jobs.queued_timeout_seconds,
            )
        # Jobs just moved back to planned were updated "now": publish them without the grace period.
        grace = now - timedelta(seconds=self.jobs.planned_grace_seconds)
        with Session(self.engine) as s:
            ids = s.exec(
                select(Job.id).where(Job.state == PLANNED, (col(Job.updated_at) < grace) | (col(Job.updated_at) == now))
            ).all()
        r.published = self.publish_planned(list(ids), now=now) if ids else 0
        return r

    def _requeue_orphaned_messages(self, now: datetime) -> int:
        """Queued jobs older than a lease on a queue where nothing waits -> planned (published again).

        Their message was delivered to a consumer, and a live worker claims a delivered job within
        seconds (prefetch 1: it takes a message only when idle), so a job still queued a lease time
        later had its message taken by a consumer that died: the embedded transport hides a taken
        message for good, and kombu restores it only on a clean shutdown. Re-publishing is safe
        (a duplicate message is acked and ignored; the claim lets one run hold the job); it costs
        at worst one extra message for a worker still loading its model. A queue with messages
        waiting is left alone: those jobs are in line, and queued_timeout_seconds still covers them.
        """
        before = now - timedelta(seconds=self.jobs.lease_seconds)
        with Session(self.engine) as s:
            queues = sorted(
                set(s.exec(select(Job.queue).where(Job.state == QUEUED, col(Job.published_at) < before)).all())
            )
        if not queues or self.publisher is None:
            return 0
        ready = self.publisher.ready_counts(queues)
        idle = [q for q in queues if ready is not None and ready.get(q) == 0]
        if not idle:
            return 0
        with Session(self.engine) as s:
            n = (
                s.execute(
                    update(Job)
                    .where(col(Job.state) == QUEUED, col(Job.published_at) < before, col(Job.queue).in_(idle))
                    .values(state=PLANNED, updated_at=now)
                ).rowcount  # type: ignore[attr-defined]
                or 0
            )
            s.commit()
        if n:
            log.warning(
                "%d queued job(s) on %s: message taken by a consumer that stopped (nothing waits in the queue); "
                "publishing again",
                n,
                ",".join(idle),
            )
        return n

    # ------------------------------------------------------------------ background loop

    def start(self) -> None:
        """Run the sweeper every `sweep_interval_seconds` in a daemon thread (the first pass at once)."""
        self._loop.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._loop.stop(timeout)


def counts(engine: Engine) -> dict[str, int]:
    """Jobs per state (every state present, zeros included)."""
    out = {st: 0 for st in (PLANNED, QUEUED, RUNNING, DONE, FAILED)}
    with Session(engine) as s:
        for state, n in s.exec(select(Job.state, func.count()).group_by(Job.state)):
            out[state] = n
    return out
