"""Read models for the console pages: per-study glance, workers, throughput, outputs of a study.

Plain functions over the engine returning JSON-friendly dicts (no HTML here).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node.export.models import OutboxRow
from dicom_node.jobs.models import FAILED, PLANNED, QUEUED, Job, JobOutput
from dicom_node.models import Instance, Patient, Study


def glance(engine: Engine, study_uids: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
    """study_uid -> {"jobs": {state: n}, "deliveries": {state: n}} for a page of studies."""
    out: dict[str, dict[str, dict[str, int]]] = {u: {"jobs": {}, "deliveries": {}} for u in study_uids}
    if not study_uids:
        return out
    with Session(engine) as s:
        for uid, state, n in s.exec(
            select(Job.study_instance_uid, Job.state, func.count())
            .where(col(Job.study_instance_uid).in_(list(study_uids)))
            .group_by(Job.study_instance_uid, Job.state)
        ):
            out[uid]["jobs"][state] = n
        for uid, state, n in s.exec(
            select(OutboxRow.study_instance_uid, OutboxRow.state, func.count())
            .where(col(OutboxRow.study_instance_uid).in_(list(study_uids)), col(OutboxRow.job_id).is_not(None))
            .group_by(OutboxRow.study_instance_uid, OutboxRow.state)
        ):
            if uid in out:
                out[uid]["deliveries"][state] = n
    return out


def patients(engine: Engine, study_ids: Sequence[int]) -> dict[int, dict[str, str | None]]:
    """study id -> patient name/ID (only for callers whose role may see them)."""
    if not study_ids:
        return {}
    with Session(engine) as s:
        rows = s.exec(
            select(Study.id, Patient.patient_name, Patient.patient_id, Study.study_description)
            .join(Patient, Patient.id == Study.patient_pk)  # type: ignore[arg-type]
            .where(col(Study.id).in_(list(study_ids)))
        ).all()
    return {i: {"patient_name": n, "patient_id": p, "description": d} for i, n, p, d in rows}


def study_ids_for_patient(engine: Engine, text: str, limit: int = 200) -> list[int]:
    """Studies whose patient name or ID contains `text` (case-insensitive)."""
    pattern = f"%{text.strip()}%"
    with Session(engine) as s:
        return list(
            s.exec(
                select(Study.id)
                .join(Patient, Patient.id == Study.patient_pk)  # type: ignore[arg-type]
                .where(col(Patient.patient_name).ilike(pattern) | col(Patient.patient_id).ilike(pattern))
                .order_by(col(Study.last_received_at).desc())
                .limit(limit)
            ).all()
        )


def workers(engine: Engine, within_hours: float = 24.0, now: datetime | None = None) -> list[dict[str, Any]]:
    """Workers seen in job claims recently: last activity, jobs run, model/device of the last job."""
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=within_hours)
    with Session(engine) as s:
        rows = s.exec(
            select(Job.worker, func.max(Job.updated_at), func.count())
            .where(col(Job.worker).is_not(None), Job.updated_at >= since)
            .group_by(Job.worker)
        ).all()
        out = []
        for worker, last, n in rows:
            latest = s.exec(
                select(Job.state).where(Job.worker == worker).order_by(col(Job.updated_at).desc()).limit(1)
            ).first()
            # The model a worker runs is recorded with each job it finished (engine.info).
            info = (
                s.exec(
                    select(Job.model_info)
                    .where(Job.worker == worker, col(Job.model_info).is_not(None))
                    .order_by(col(Job.updated_at).desc())
                    .limit(1)
                ).first()
                or {}
            )
            last_aware = last if last.tzinfo else last.replace(tzinfo=UTC)
            out.append(
                {
                    "worker": worker,
                    "last_activity_s": max((now - last_aware).total_seconds(), 0.0),
                    "jobs": n,
                    "state": latest,
                    "model": " ".join(str(info[k]) for k in ("model_name", "version") if info.get(k)) or None,
                    "device": " ".join(str(info[k]) for k in ("device", "dtype") if info.get(k)) or None,
                    # weights loaded: "understanding" (~16 GiB on GPU) or "all" (~30 GiB)
                    "parts": info.get("parts"),
                    "info": info,
                }
            )
    return sorted(out, key=lambda w: w["last_activity_s"])


def throughput(engine: Engine, now: datetime | None = None) -> dict[str, Any]:
    """Last hour: instances received, jobs done/failed, deliveries done/failed; waiting jobs per queue."""
    now = now or datetime.now(UTC)
    hour = now - timedelta(hours=1)
    with Session(engine) as s:
        received = s.exec(select(func.count()).select_from(Instance).where(Instance.received_at >= hour)).one()
        jobs = dict(
            s.exec(
                select(Job.state, func.count())
                .where(Job.finished_at >= hour)  # type: ignore[operator]
                .group_by(Job.state)
            ).all()
        )
        failed_jobs = s.exec(
            select(func.count()).select_from(Job).where(Job.state == FAILED, Job.updated_at >= hour)
        ).one()
        delivered = s.exec(
            select(func.count()).select_from(OutboxRow).where(OutboxRow.done_at >= hour)  # type: ignore[operator]
        ).one()
        failed_deliveries = s.exec(
            select(func.count()).select_from(OutboxRow).where(OutboxRow.state == FAILED, OutboxRow.updated_at >= hour)
        ).one()
        queues = dict(
            s.exec(
                select(Job.queue, func.count()).where(col(Job.state).in_([PLANNED, QUEUED])).group_by(Job.queue)
            ).all()
        )
    return {
        "instances_received": int(received),
        "jobs_done": int(jobs.get("done", 0)),
        "jobs_failed": int(failed_jobs),
        "deliveries_done": int(delivered),
        "deliveries_failed": int(failed_deliveries),
        "queues": queues,
    }


def study_outputs(engine: Engine, study_uid: str) -> dict[int, list[dict[str, Any]]]:
    """job id -> its outputs (id, kind, SOP class, SOP instance UID) for one study."""
    with Session(engine) as s:
        rows = s.exec(
            select(JobOutput)
            .join(Job, Job.id == JobOutput.job_id)  # type: ignore[arg-type]
            .where(Job.study_instance_uid == study_uid)
            .order_by(col(JobOutput.id))
        ).all()
    out: dict[int, list[dict[str, Any]]] = {}
    for o in rows:
        out.setdefault(o.job_id, []).append(
            {"id": o.id, "kind": o.kind, "sop_class_uid": o.sop_class_uid, "sop_instance_uid": o.sop_instance_uid}
        )
    return out


def study_id_by_uid(engine: Engine, study_uid: str) -> int | None:
    with Session(engine) as s:
        return s.exec(select(Study.id).where(Study.study_instance_uid == study_uid)).first()
