"""Status API: /healthz, /metrics, /api/studies, /api/rejections, /api/duplicates and a small page.

Patient identifiers are not served (studies are shown by accession number, date and UIDs).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import desc, func, select, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from dicom_node.config import Settings
from dicom_node.db import make_engine
from dicom_node.metrics import IndexCollector, app_registry, render
from dicom_node.models import DuplicateEvent, Instance, Rejection, Series, Study, StudyRevision
from dicom_node.storage import Storage

log = logging.getLogger("dicom_node.api")


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def study_summaries(engine: Engine, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    with Session(engine) as s:
        rows = s.execute(
            select(Study, StudyRevision)
            .join(
                StudyRevision,
                (StudyRevision.study_pk == Study.id) & (StudyRevision.revision == Study.current_revision),
                isouter=True,
            )
            .order_by(desc(Study.last_received_at), desc(Study.id))
            .limit(limit)
            .offset(offset)
        ).all()
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
) -> FastAPI:
    write_engine = engine if engine is not None else make_engine(settings.database.url)
    # Status reads must not take SQLite's write lock (see dicom_node.db): readonly engine view.
    engine = write_engine.execution_options(readonly=True)
    app = FastAPI(title="UniMedVL gateway", version="0.1.0")
    app.state.engine = write_engine
    app.state.settings = settings
    collectors: list[Any] = [IndexCollector(engine, active_associations)]
    storage_root = settings.storage.path

    try:  # the outbox routes, when the export package is present
        from dicom_node.export.api import router as outbox_router
        from dicom_node.export.metrics import OutboxCollector

        app.include_router(outbox_router)
        collectors.append(OutboxCollector(engine))
    except ImportError:  # pragma: no cover
        log.info("outbox API not available")

    from dicom_node.jobs.metrics import JobCollector

    collectors.append(JobCollector(engine))
    registry = app_registry(*collectors)
    app.state.metrics_registry = registry

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        checks: dict[str, Any] = {}
        ok = True
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            ok = False
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            st = Storage(storage_root, settings.storage.min_free_bytes)
            free = st.free_bytes()
            checks["storage_free_bytes"] = free
            if free < settings.storage.min_free_bytes:
                ok = False
                checks["storage"] = "below min_free_bytes: C-STOREs are refused (0xA700)"
            else:
                checks["storage"] = "ok"
        except Exception as exc:
            ok = False
            checks["storage"] = f"error: {type(exc).__name__}"
        if active_associations is not None:
            checks["active_associations"] = active_associations()
        return JSONResponse({"status": "ok" if ok else "degraded", **checks}, status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return {"counts": counts(engine), "ae_title": settings.node.ae_title, "port": settings.node.port}

    @app.get("/api/studies")
    def studies(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> list[dict[str, Any]]:
        return study_summaries(engine, limit=limit, offset=offset)

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

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> str:
        return _page(counts(engine), study_summaries(engine, limit=50), rejection_list(engine, 10))

    return app


def _page(c: dict[str, Any], studies: list[dict[str, Any]], rejections: list[dict[str, Any]]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td><a href='/api/studies/{s['id']}'>{s['id']}</a></td><td>{e(str(s['accession_number'] or ''))}</td>"
        f"<td>{e(str(s['study_date'] or ''))}</td><td>{e(','.join(s['modalities']))}</td>"
        f"<td>{s['series_count']}</td><td>{s['instance_count']}</td><td>{s['revision']}</td>"
        f"<td>{e(str(s['state']))}</td><td>{e(str(s['last_received_at']))}</td></tr>"
        for s in studies
    )
    rej = "".join(
        f"<tr><td>{e(str(r['at']))}</td><td>{e(r['stage'])}</td><td>{e(r['reason'])}</td>"
        f"<td>{e(str(r['status'] or ''))}</td><td>{e(str(r['calling_ae'] or ''))}</td>"
        f"<td>{e(str(r['remote_ip'] or ''))}</td><td>{e(r['detail'])}</td></tr>"
        for r in rejections
    )
    summary = " · ".join(f"{e(k)}: {v}" for k, v in c.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>UniMedVL gateway</title>
<meta http-equiv="refresh" content="10">
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:90%}}</style></head><body>
<h1>UniMedVL gateway</h1><p>{summary}</p>
<p><a href="/metrics">metrics</a> · <a href="/api/studies">studies (JSON)</a> ·
<a href="/api/rejections">rejections</a> · <a href="/api/duplicates">duplicates</a> · <a href="/healthz">health</a></p>
<h2>Recent studies</h2><table><tr><th>id</th><th>accession</th><th>date</th><th>modalities</th><th>series</th>
<th>instances</th><th>revision</th><th>state</th><th>last received</th></tr>{rows}</table>
<h2>Recent rejections</h2><table><tr><th>at</th><th>stage</th><th>reason</th><th>status</th><th>calling AE</th>
<th>remote IP</th><th>detail</th></tr>{rej}</table></body></html>"""
