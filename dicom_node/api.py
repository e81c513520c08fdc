"""Status API and console app: /healthz, /readyz, /metrics (open); /api/* and the console pages
behind a login (see dicom_node.console.guard).

Patient identifiers are not served by the JSON API (studies are shown by accession number, date
and UIDs); the console shows them to roles in `console.phi_roles` only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import desc, func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from dicom_node.config import Settings
from dicom_node.db import make_engine
from dicom_node.metrics import IndexCollector, app_registry, render
from dicom_node.models import DuplicateEvent, Instance, Rejection, Series, Study, StudyRevision

log = logging.getLogger("dicom_node.api")


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def study_summaries(
    engine: Engine,
    *,
    limit: int = 100,
    offset: int = 0,
    date: str | None = None,
    modality: str | None = None,
    accession: str | None = None,
    ids: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Newest first; filters: StudyDate (YYYYMMDD, or a prefix such as YYYYMM), a modality of any
    series, accession number (substring), study ids."""
    query = select(Study, StudyRevision).join(
        StudyRevision,
        (StudyRevision.study_pk == Study.id) & (StudyRevision.revision == Study.current_revision),
        isouter=True,
    )
    if date:
        query = query.where(Study.study_date.startswith(date.replace("-", "")))  # type: ignore[union-attr]
    if accession:
        query = query.where(Study.accession_number.contains(accession))  # type: ignore[union-attr]
    if modality:
        query = query.where(
            Study.id.in_(select(Series.study_pk).where(func.upper(Series.modality) == modality.strip().upper()))  # type: ignore[union-attr]
        )
    if ids is not None:
        query = query.where(Study.id.in_(ids))  # type: ignore[union-attr]
    with Session(engine) as s:
        rows = s.execute(query.order_by(desc(Study.last_received_at), desc(Study.id)).limit(limit).offset(offset)).all()
        ids = [st.id for st, _ in rows]
        series_counts = (
            dict(
                s.execute(
                    select(Series.study_pk, func.count(Series.id))
                    .where(Series.study_pk.in_(ids))
                    .group_by(Series.study_pk)
                ).all()
            )
            if ids
            else {}
        )
        modalities: dict[int, set[str]] = {}
        if ids:
            for study_pk, modality in s.execute(
                select(Series.study_pk, Series.modality).where(Series.study_pk.in_(ids)).distinct()
            ).all():
                if modality:
                    modalities.setdefault(study_pk, set()).add(modality)
    return [_study_dict(st, rev, series_counts.get(st.id, 0), sorted(modalities.get(st.id, ()))) for st, rev in rows]


def _study_dict(st: Study, rev: StudyRevision | None, n_series: int, modalities: list[str]) -> dict[str, Any]:
    return {
        "id": st.id,
        "study_instance_uid": st.study_instance_uid,
        "accession_number": st.accession_number,
        "study_date": st.study_date,
        "study_description": st.study_description,
        "modalities": modalities,
        "series_count": n_series,
        "instance_count": st.instance_count,
        "revision": st.current_revision,
        "state": rev.state if rev else None,
        "completion_reason": rev.reason if rev else None,
        "first_received_at": _iso(rev.first_received_at) if rev else None,
        "last_received_at": _iso(st.last_received_at),
        "completed_at": _iso(rev.completed_at) if rev else None,
    }


def study_detail(engine: Engine, study_id: int) -> dict[str, Any] | None:
    with Session(engine) as s:
        st = s.get(Study, study_id)
        if st is None:
            return None
        revs = (
            s.execute(select(StudyRevision).where(StudyRevision.study_pk == st.id).order_by(StudyRevision.revision))
            .scalars()
            .all()
        )
        series = (
            s.execute(select(Series).where(Series.study_pk == st.id).order_by(Series.series_number, Series.id))
            .scalars()
            .all()
        )
        dup = s.execute(
            select(func.coalesce(func.sum(Instance.duplicate_count), 0)).where(Instance.study_pk == st.id)
        ).scalar_one()
        current = next((r for r in revs if r.revision == st.current_revision), None)
        out = _study_dict(st, current, len(series), sorted({x.modality for x in series if x.modality}))
        out["duplicates"] = int(dup)
        out["revisions"] = [
            {
                "revision": r.revision,
                "state": r.state,
                "reason": r.reason,
                "instance_count": r.instance_count,
                "first_received_at": _iso(r.first_received_at),
                "last_received_at": _iso(r.last_received_at),
                "completed_at": _iso(r.completed_at),
                "notified_at": _iso(r.notified_at),
            }
            for r in revs
        ]
        out["series"] = [
            {
                "id": x.id,
                "series_instance_uid": x.series_instance_uid,
                "series_number": x.series_number,
                "modality": x.modality,
                "body_part_examined": x.body_part_examined,
                "series_description": x.series_description,
                "instance_count": x.instance_count,
                "state": x.state,
                "completion_reason": x.completion_reason,
                "expected_instances": x.expected_instances if x.count_known else None,
                "last_received_at": _iso(x.last_received_at),
                "completed_at": _iso(x.completed_at),
            }
            for x in series
        ]
    return out


def rejection_list(engine: Engine, limit: int = 50) -> list[dict[str, Any]]:
    with Session(engine) as s:
        rows = s.execute(select(Rejection).order_by(desc(Rejection.id)).limit(limit)).scalars().all()
    return [
        {
            "id": r.id,
            "at": _iso(r.at),
            "stage": r.stage,
            "reason": r.reason,
            "status": f"0x{r.status:04X}" if r.status is not None else None,
            "detail": r.detail,
            "calling_ae": r.calling_ae,
            "called_ae": r.called_ae,
            "remote_ip": r.remote_ip,
            "sop_class_uid": r.sop_class_uid,
        }
        for r in rows
    ]


def duplicate_list(engine: Engine, limit: int = 50) -> dict[str, Any]:
    with Session(engine) as s:
        identical = s.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.duplicate_count), 0)).where(
                Instance.duplicate_count > 0
            )
        ).one()
        events = s.execute(select(DuplicateEvent).order_by(desc(DuplicateEvent.id)).limit(limit)).scalars().all()
    return {
        "instances_with_duplicates": int(identical[0]),
        "duplicates_total": int(identical[1]),
        "conflicts": [
            {
                "id": e.id,
                "at": _iso(e.at),
                "instance_id": e.instance_pk,
                "sop_instance_uid": e.sop_instance_uid,
                "policy": e.policy,
                "action": e.action,
                "previous_sha256": e.previous_sha256,
                "received_sha256": e.received_sha256,
                "kept_aside": e.received_relpath if e.action == "kept_first" else e.previous_relpath,
                "calling_ae": e.calling_ae,
                "remote_ip": e.remote_ip,
            }
            for e in events
        ],
    }


def counts(engine: Engine) -> dict[str, Any]:
    with Session(engine) as s:
        n_inst, n_bytes, n_dup = s.execute(
            select(
                func.count(Instance.id),
                func.coalesce(func.sum(Instance.size), 0),
                func.coalesce(func.sum(Instance.duplicate_count), 0),
            )
        ).one()
        n_studies = s.execute(select(func.count(Study.id))).scalar_one()
        n_series = s.execute(select(func.count(Series.id))).scalar_one()
        states = dict(
            s.execute(select(StudyRevision.state, func.count(StudyRevision.id)).group_by(StudyRevision.state)).all()
        )
        n_rej = s.execute(select(func.count(Rejection.id))).scalar_one()
        n_conf = s.execute(select(func.count(DuplicateEvent.id))).scalar_one()
    return {
        "studies": int(n_studies),
        "series": int(n_series),
        "instances": int(n_inst),
        "bytes": int(n_bytes),
        "duplicates": int(n_dup),
        "duplicate_conflicts": int(n_conf),
        "rejections": int(n_rej),
        "revisions_receiving": int(states.get("receiving", 0)),
        "revisions_complete": int(states.get("complete", 0)),
    }


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    active_associations: Callable[[], int] | None = None,
    publisher: Any = None,
) -> FastAPI:
    """The whole HTTP app: open health/metrics, the JSON API (jobs, outbox, index) and the console,
    all but /healthz, /readyz, /metrics and /login behind `dicom_node.console.guard.guard`.
    `publisher` (a jobs Publisher) publishes retried jobs at once; without it the sweeper does."""
    from dicom_node.console.guard import guard
    from dicom_node.console.health import ReadinessChecker, ReadinessCollector, SafeCollector
    from dicom_node.console.pages import console_router
    from dicom_node.export.api import router as outbox_router
    from dicom_node.export.metrics import OutboxCollector
    from dicom_node.jobs import job_settings
    from dicom_node.jobs.api import jobs_router

    write_engine = engine if engine is not None else make_engine(settings.database.url)
    # Status reads must not take SQLite's write lock (see dicom_node.db): readonly engine view.
    engine = write_engine.execution_options(readonly=True)
    # The guard is an app-wide dependency: routers included later (by anyone) are covered too.
    # No /docs, /redoc, /openapi.json: they are plain Starlette routes the guard would not cover.
    app = FastAPI(
        title="UniMedVL gateway",
        version="0.1.0",
        dependencies=[Depends(guard)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine = write_engine
    app.state.read_engine = engine
    app.state.settings = settings
    readiness = ReadinessChecker(settings, engine)
    app.state.readiness = readiness
    from dicom_node.batch.metrics import BatchCollector
    from dicom_node.jobs.metrics import JobCollector

    registry = app_registry(
        SafeCollector(IndexCollector(engine, active_associations)),
        SafeCollector(OutboxCollector(engine)),
        SafeCollector(JobCollector(engine)),
        SafeCollector(BatchCollector(engine)),
        ReadinessCollector(readiness),
    )
    app.state.metrics_registry = registry
    try:
        job_cfg: Any = job_settings(settings)
    except Exception:
        job_cfg = None  # the service refuses a bad [jobs] table before the API starts
    from dicom_node.dicomweb import dicomweb_router
    from dicom_node.jobs.uploads import uploads_router
    from dicom_node.storage import Storage

    @functools.cache
    def storage() -> Storage:  # opened on first use: an API that serves no worker creates no folders
        return Storage(settings.storage.path, settings.storage.min_free_bytes)

    app.include_router(outbox_router)
    app.include_router(jobs_router(write_engine, publisher, job_cfg))
    # Remote workers (no shared disk): WADO-RS retrieval of stored instances, upload of outputs.
    app.include_router(dicomweb_router(engine, storage, list(settings.console.phi_roles)))
    app.include_router(uploads_router(write_engine, storage, [d.name for d in settings.destinations]))
    app.include_router(console_router(publisher, job_cfg))

    @app.exception_handler(HTTPException)
    async def _errors(request: Request, exc: HTTPException) -> Response:
        # Pages get a readable HTML sentence; the API (and redirects) keep FastAPI's JSON.
        if (
            request.url.path.startswith("/api/")
            or exc.status_code < 400
            or "text/html" not in request.headers.get("accept", "")
        ):
            return await http_exception_handler(request, exc)
        body = (
            f"<!doctype html><meta charset='utf-8'><title>{exc.status_code}</title><h1>{exc.status_code}</h1>"
            f"<p id='error'>{_escape(str(exc.detail))}</p><p><a href='/'>back to the dashboard</a></p>"
        )
        return HTMLResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """Liveness: the process answers. Readiness (dependencies, backlog) is /readyz."""
        out: dict[str, Any] = {"status": "ok"}
        if active_associations is not None:
            out["active_associations"] = active_associations()
        return JSONResponse(out)

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        r = readiness.check()
        return JSONResponse(r.as_dict(), status_code=200 if r.ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return {"counts": counts(engine), "ae_title": settings.node.ae_title, "port": settings.node.port}

    @app.get("/api/studies")
    def studies(
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
        date: str | None = Query(None, description="StudyDate YYYYMMDD or a prefix"),
        modality: str | None = None,
        accession: str | None = None,
    ) -> list[dict[str, Any]]:
        return study_summaries(engine, limit=limit, offset=offset, date=date, modality=modality, accession=accession)

    @app.get("/api/studies/{study_id}")
    def study(study_id: int) -> dict[str, Any]:
        out = study_detail(engine, study_id)
        if out is None:
            raise HTTPException(404, f"no study with id {study_id}")
        return out

    @app.get("/api/rejections")
    def rejections(limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
        return rejection_list(engine, limit)

    @app.get("/api/duplicates")
    def duplicates(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        return duplicate_list(engine, limit)

    @app.get("/api/readyz")
    def ready_detail() -> dict[str, Any]:
        return readiness.check().as_dict()

    return app


def _escape(text_: str) -> str:
    import html

    return html.escape(text_)
