"""Operator views and actions on jobs: listing, status summary, retry (for CLI and API)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node import leases
from dicom_node.db import newest_page
from dicom_node.jobs.models import DONE, FAILED, PLANNED, QUEUED, RUNNING, Job, JobOutput, StudyPlanRecord
from dicom_node.jobs.settings import JobSettings, utcnow

log = logging.getLogger("dicom_node.jobs.admin")


def retry_jobs(
    engine: Engine,
    ids: Sequence[int] | None = None,
    *,
    all_failed: bool = False,
    publisher: Any = None,
    jobs: JobSettings | None = None,
) -> list[int]:
    """Failed jobs back to "planned" so they run again. Returns the ids re-queued.

    Attempts stay as they were (the history is kept; `retries` counts operator re-queues) and
    max_attempts is raised by the configured allowance, so a job that fails again shows its
    real attempt count. With a `Publisher` the jobs are published at once; otherwise the
    sweeper of the running node publishes them within a sweep interval.
    """
    if not ids and not all_failed:
        raise ValueError("give job ids or all_failed=True")
    allowance = (jobs or JobSettings()).max_attempts
    now = utcnow()
    with Session(engine) as s:
        query = select(Job.id).where(Job.state == FAILED)
        if ids:
            query = query.where(col(Job.id).in_(list(ids)))
        chosen = sorted(i for i in s.exec(query).all() if i is not None)
        if chosen:
            s.execute(
                update(Job)
                .where(col(Job.id).in_(chosen), col(Job.state) == FAILED)
                .values(
                    state=PLANNED,
                    max_attempts=Job.attempts + allowance,
                    retries=Job.retries + 1,
                    **leases.CLEARED,
                    finished_at=None,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            s.commit()
    if chosen:
        log.info("re-queued %d failed job(s)", len(chosen))
        if publisher is not None:
            from dicom_node.jobs.planner import Planner

            Planner(engine, [], publisher).publish_planned(chosen)
    return chosen


def job_dict(job: Job, outputs: Sequence[JobOutput] = ()) -> dict[str, Any]:
    def t(v: Any) -> str | None:
        return v.isoformat() if v is not None else None

    return {
        "id": job.id,
        "study_instance_uid": job.study_instance_uid,
        "revision": job.revision,
        "rule": job.rule,
        "kind": job.kind,
        "queue": job.queue,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "retries": job.retries,
        "worker": job.worker,
        "model_version": job.model_version,
        "series_uids": list(job.series_uids),
        "created_at": t(job.created_at),
        "started_at": t(job.started_at),
        "finished_at": t(job.finished_at),
        "lease_until": t(job.lease_until),
        "error": job.error,
        "summary": job.summary,
        "outputs": [
            {"sop_instance_uid": o.sop_instance_uid, "kind": o.kind, "outbox_ids": list(o.outbox_ids)} for o in outputs
        ],
    }


def list_jobs(
    engine: Engine,
    *,
    state: str | None = None,
    study_instance_uid: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Newest first, with their outputs (JSON-friendly, for `unimedvl jobs` and GET /api/jobs)."""
    with Session(engine) as s:
        page = newest_page(Job, limit=limit, offset=offset, state=state, study_instance_uid=study_instance_uid)
        jobs = s.exec(page).all()
        ids = [j.id for j in jobs]
        outs: dict[int, list[JobOutput]] = {}
        if ids:
            for o in s.exec(select(JobOutput).where(col(JobOutput.job_id).in_(ids)).order_by(col(JobOutput.id))):
                outs.setdefault(o.job_id, []).append(o)
        return [job_dict(j, outs.get(j.id or 0, [])) for j in jobs]


def get_job(engine: Engine, job_id: int) -> dict[str, Any] | None:
    with Session(engine) as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        outs = s.exec(select(JobOutput).where(JobOutput.job_id == job_id).order_by(col(JobOutput.id))).all()
        return job_dict(job, outs)


def jobs_status(engine: Engine, *, last_errors: int = 5) -> dict[str, Any]:
    """Counts per state, output count, latest failures and study revisions with unmatched series."""
    with Session(engine) as s:
        counts = {st: 0 for st in (PLANNED, QUEUED, RUNNING, DONE, FAILED)}
        for state, n in s.exec(select(Job.state, func.count()).group_by(Job.state)):
            counts[state] = n
        outputs = s.exec(select(func.count()).select_from(JobOutput)).one()
        failed = s.exec(
            select(Job).where(Job.state == FAILED).order_by(col(Job.updated_at).desc()).limit(last_errors)
        ).all()
        plans = s.exec(select(StudyPlanRecord).order_by(col(StudyPlanRecord.planned_at).desc()).limit(50)).all()
        unmatched = [
            {
                "study_instance_uid": p.study_instance_uid,
                "revision": p.revision,
                "unmatched_series": list(p.unmatched_series),
                "note": p.note,
            }
            for p in plans
            if p.unmatched_series
        ]
        return {
            "counts": counts,
            "outputs": outputs,
            "last_errors": [
                {
                    "id": j.id,
                    "kind": j.kind,
                    "attempts": j.attempts,
                    "error": j.error,
                    "study_instance_uid": j.study_instance_uid,
                }
                for j in failed
            ],
            "unmatched": unmatched,
        }


def study_plan(engine: Engine, study_instance_uid: str) -> list[dict[str, Any]]:
    """The routing plan of every revision of a study ("matched no rule" series included)."""
    with Session(engine) as s:
        plans = s.exec(
            select(StudyPlanRecord)
            .where(StudyPlanRecord.study_instance_uid == study_instance_uid)
            .order_by(col(StudyPlanRecord.revision))
        ).all()
        return [
            {
                "revision": p.revision,
                "planned_at": p.planned_at.isoformat(),
                "model_version": p.model_version,
                "tasks_planned": p.tasks_planned,
                "job_ids": list(p.job_ids),
                "series_uids": list(p.series_uids),
                "unmatched_series": list(p.unmatched_series),
                "note": p.note,
            }
            for p in plans
        ]


def study_timeline(engine: Engine, study_instance_uid: str) -> dict[str, Any] | None:
    """Per revision: received -> complete -> planned -> jobs ran -> outputs -> delivered (for status/API)."""
    from dicom_node.export.models import OutboxRow
    from dicom_node.models import Instance, Series, Study, StudyRevision

    def t(v: Any) -> str | None:
        return v.isoformat() if v is not None else None

    with Session(engine) as s:
        study = s.exec(select(Study).where(Study.study_instance_uid == study_instance_uid)).first()
        if study is None:
            return None
        revisions = s.exec(
            select(StudyRevision).where(StudyRevision.study_pk == study.id).order_by(col(StudyRevision.revision))
        ).all()
        plans = {
            p.revision: p
            for p in s.exec(select(StudyPlanRecord).where(StudyPlanRecord.study_instance_uid == study_instance_uid))
        }
        jobs = s.exec(
            select(Job).where(Job.study_instance_uid == study_instance_uid).order_by(col(Job.revision), col(Job.id))
        ).all()
        job_ids = [j.id for j in jobs]
        outputs: dict[int, list[JobOutput]] = {}
        deliveries: dict[int, list[OutboxRow]] = {}
        if job_ids:
            for o in s.exec(select(JobOutput).where(col(JobOutput.job_id).in_(job_ids))):
                outputs.setdefault(o.job_id, []).append(o)
            for r in s.exec(select(OutboxRow).where(col(OutboxRow.job_id).in_(job_ids))):
                deliveries.setdefault(r.job_id or 0, []).append(r)
        touched: dict[int, list[dict[str, Any]]] = {}
        for rev_n, uid, state, reason in s.exec(
            select(Instance.revision, Series.series_instance_uid, Series.state, Series.completion_reason)
            .join(Series, col(Series.id) == col(Instance.series_pk))
            .where(Instance.study_pk == study.id)
            .distinct()
            .order_by(col(Instance.revision), col(Series.series_instance_uid))
        ):
            touched.setdefault(rev_n, []).append(
                {"series_instance_uid": uid, "state": state, "completed_because": reason}
            )
        out = []
        for rev in revisions:
            plan = plans.get(rev.revision)
            rev_jobs = []
            for j in (j for j in jobs if j.revision == rev.revision):
                rows = deliveries.get(j.id or 0, [])
                rev_jobs.append(
                    {
                        "id": j.id,
                        "kind": j.kind,
                        "rule": j.rule,
                        "state": j.state,
                        "attempts": j.attempts,
                        "created_at": t(j.created_at),
                        "started_at": t(j.started_at),
                        "finished_at": t(j.finished_at),
                        "error": j.error,
                        "outputs": len(outputs.get(j.id or 0, [])),
                        "deliveries": [
                            {
                                "destination": r.destination,
                                "state": r.state,
                                "attempts": r.attempts,
                                "done_at": t(r.done_at),
                                "last_error": r.last_error,
                            }
                            for r in sorted(rows, key=lambda r: r.id or 0)
                        ],
                    }
                )
            out.append(
                {
                    "revision": rev.revision,
                    "received_first": t(rev.first_received_at),
                    "received_last": t(rev.last_received_at),
                    "instances": rev.instance_count,
                    "state": rev.state,
                    "completed_at": t(rev.completed_at),
                    "completed_because": rev.reason,
                    # Each series' state now and why it completed (mpps | count | quiet | force).
                    "series": touched.get(rev.revision, []),
                    "planned_at": t(plan.planned_at) if plan else None,
                    "tasks_planned": plan.tasks_planned if plan else None,
                    "unmatched_series": list(plan.unmatched_series) if plan else [],
                    "plan_note": plan.note if plan else None,
                    "jobs": rev_jobs,
                }
            )
        return {"study_instance_uid": study_instance_uid, "revisions": out}
