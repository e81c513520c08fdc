"""Status API routes for jobs; mount with `app.include_router(jobs_router(engine, publisher))`.

GET /api/jobs, GET /api/jobs/{id}, POST /api/jobs/{id}/retry, GET /api/jobs/status,
GET /api/studies/{study_instance_uid}/timeline.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy.engine import Engine

from dicom_node.jobs.admin import get_job, jobs_status, list_jobs, retry_jobs, study_timeline
from dicom_node.jobs.models import STATES
from dicom_node.jobs.settings import JobSettings


def jobs_router(engine: Engine, publisher: Any = None, jobs: JobSettings | None = None) -> APIRouter:
    router = APIRouter()

    @router.get("/api/jobs")
    def jobs_list(
        state: str | None = Query(None),
        study: str | None = Query(None, description="StudyInstanceUID"),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise HTTPException(422, f"state must be one of {', '.join(STATES)}")
        return list_jobs(engine, state=state, study_instance_uid=study, limit=limit, offset=offset)

    @router.get("/api/jobs/status")
    def jobs_summary() -> dict[str, Any]:
        return jobs_status(engine)

    @router.get("/api/jobs/{job_id}")
    def job_detail(job_id: int) -> dict[str, Any]:
        job = get_job(engine, job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    @router.post("/api/jobs/{job_id}/retry")
    def job_retry(job_id: int) -> dict[str, Any]:
        job = get_job(engine, job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        if job["state"] != "failed":
            raise HTTPException(409, f"job is {job['state']}; only failed jobs can be retried")
        retry_jobs(engine, ids=[job_id], publisher=publisher, jobs=jobs)
        return get_job(engine, job_id) or {}

    @router.get("/api/studies/{study_instance_uid}/timeline")
    def timeline(study_instance_uid: str) -> dict[str, Any]:
        data = study_timeline(engine, study_instance_uid)
        if data is None:
            raise HTTPException(404, "no such study")
        return data

    return router
