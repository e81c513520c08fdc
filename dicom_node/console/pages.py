"""Console pages (server-rendered, Jinja2): login, dashboard, studies, one study's timeline with
previews, jobs, deliveries, research batches, rejections and duplicates, routing rules with a dry run.

Every route sits behind `dicom_node.console.guard.guard` (installed app-wide by
`dicom_node.api.create_app`). Patient name/ID appear only for roles in `console.phi_roles`, and
never in a URL: the patient search is a POST form.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlmodel import Session, select

from dicom_node import api as index_api
from dicom_node.batch.results import batch_status, list_batches
from dicom_node.console import views
from dicom_node.console.auth import check_password, create_session, end_session
from dicom_node.console.guard import SESSION_COOKIE, current
from dicom_node.console.previews import PreviewError, seg_overlay_png, sr_text, thumbnail_png
from dicom_node.export.cli import outbox_status_data
from dicom_node.export.models import STATES as OUTBOX_STATES
from dicom_node.export.outbox import requeue, rows
from dicom_node.jobs.admin import jobs_status, list_jobs, retry_jobs, study_timeline
from dicom_node.jobs.models import STATES as JOB_STATES
from dicom_node.jobs.models import JobOutput
from dicom_node.models import Instance
from dicom_node.storage import Storage

log = logging.getLogger("dicom_node.console.pages")
templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
SR_CLASSES_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
IMAGE_KINDS = {"sc", "derived"}


def _local_path(target: str | None, default: str = "/") -> str:
    """Only same-site paths as redirect targets (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def console_router(publisher: Any = None, jobs_settings: Any = None) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def render(request: Request, name: str, **ctx: Any) -> HTMLResponse:
        p = getattr(request.state, "principal", None)
        settings = request.app.state.settings
        ctx.update(
            user=p,
            csrf=p.csrf_token if p else "",
            phi=bool(p and p.role in settings.console.phi_roles),
            ae_title=settings.node.ae_title,
            flash=request.query_params.get("flash"),
        )
        return templates.TemplateResponse(request, name, ctx)

    def engine(request: Request) -> Any:
        return request.app.state.read_engine

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return render(request, "login.html", next=_local_path(next), error=None)

    @router.post("/login")
    def login(
        request: Request, username: str = Form(...), password: str = Form(...), next: str = Form("/")
    ) -> Response:
        settings = request.app.state.settings
        user = check_password(request.app.state.engine, username, password)
        if user is None:
            log.warning("console login failed")  # the typed name is not logged: people type passwords into it
            resp = render(request, "login.html", next=_local_path(next), error="Wrong user name or password.")
            resp.status_code = 401
            return resp
        token, _csrf = create_session(request.app.state.engine, user, settings.console.session_hours)
        log.info("console login: %s", user.name)
        resp = RedirectResponse(_local_path(next), status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(settings.console.session_hours * 3600),
            httponly=True,
            samesite="strict",
            secure=settings.console.cookie_secure,
        )
        return resp

    @router.post("/logout")
    def logout(request: Request) -> Response:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            end_session(request.app.state.engine, cookie)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    @router.get("/", response_class=HTMLResponse)
    def dashboard(request: Request) -> HTMLResponse:
        e = engine(request)
        ready = request.app.state.readiness.check()
        return render(
            request,
            "dashboard.html",
            ready=ready,
            counts=index_api.counts(e),
            jobs=jobs_status(e),
            outbox=outbox_status_data(e),
            workers=views.workers(e),
            hour=views.throughput(e),
        )

    def _studies_page(request: Request, ids: list[int] | None, q: dict[str, str]) -> HTMLResponse:
        e = engine(request)
        studies = index_api.study_summaries(
            e,
            limit=200,
            date=q.get("date") or None,
            modality=q.get("modality") or None,
            accession=q.get("accession") or None,
            ids=ids,
        )
        p = current(request)
        allowed = p.role in request.app.state.settings.console.phi_roles
        pats = views.patients(e, [s["id"] for s in studies]) if allowed else {}
        return render(
            request,
            "studies.html",
            studies=studies,
            glance=views.glance(e, [s["study_instance_uid"] for s in studies]),
            patients=pats,
            q=q,
        )

    @router.get("/studies", response_class=HTMLResponse)
    def studies(request: Request, date: str = "", modality: str = "", accession: str = "") -> HTMLResponse:
        return _studies_page(request, None, {"date": date, "modality": modality, "accession": accession})

    @router.post("/studies/search", response_class=HTMLResponse)
    def studies_by_patient(request: Request, patient: str = Form("")) -> HTMLResponse:
        # POST, so the patient's name never lands in a URL, a proxy log or the browser history.
        p = current(request)
        if p.role not in request.app.state.settings.console.phi_roles:
            raise HTTPException(403, "your role may not search by patient")
        ids = views.study_ids_for_patient(engine(request), patient) if patient.strip() else None
        return _studies_page(request, ids, {"patient": patient})

    @router.get("/studies/{study_id}", response_class=HTMLResponse)
    def study(request: Request, study_id: int) -> HTMLResponse:
        e = engine(request)
        detail = index_api.study_detail(e, study_id)
        if detail is None:
            raise HTTPException(404, f"no study with id {study_id}")
        uid = detail["study_instance_uid"]
        timeline = study_timeline(e, uid) or {"revisions": []}
        outputs = views.study_outputs(e, uid)
        storage = Storage(request.app.state.settings.storage.path)
        reports: dict[int, list[dict[str, Any]]] = {}
        for outs in outputs.values():
            for o in outs:
                if o["sop_class_uid"].startswith(SR_CLASSES_PREFIX):
                    try:
                        reports[o["id"]] = sr_text(storage.path(_relpath(e, o["id"])))
                    except (OSError, ValueError, AttributeError) as exc:
                        reports[o["id"]] = [{"depth": 0, "name": "cannot read the SR", "value": type(exc).__name__}]
        p = current(request)
        allowed = p.role in request.app.state.settings.console.phi_roles
        viewer = request.app.state.settings.console.viewer_url
        return render(
            request,
            "study.html",
            s=detail,
            timeline=timeline,
            outputs=outputs,
            reports=reports,
            patient=views.patients(e, [study_id]).get(study_id) if allowed else None,
            viewer_url=viewer.replace("{study_uid}", quote(uid)) if viewer else "",
        )

    @router.get("/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request, state: str = "") -> HTMLResponse:
        if state and state not in JOB_STATES:
            raise HTTPException(422, f"state must be one of {', '.join(JOB_STATES)}")
        e = engine(request)
        jobs = list_jobs(e, state=state or None, limit=200)
        ids = {j["study_instance_uid"]: views.study_id_by_uid(e, j["study_instance_uid"]) for j in jobs}
        return render(request, "jobs.html", jobs=jobs, state=state, states=JOB_STATES, study_ids=ids)

    @router.post("/jobs/{job_id}/retry")
    def job_retry(request: Request, job_id: int, next: str = Form("/jobs")) -> Response:
        done = retry_jobs(request.app.state.engine, ids=[job_id], publisher=publisher, jobs=jobs_settings)
        msg = f"job {job_id} re-queued" if done else f"job {job_id} is not failed: nothing to retry"
        log.info("console retry of job %s by %s: %s", job_id, current(request).name, "ok" if done else "skipped")
        return RedirectResponse(_flash(_local_path(next, "/jobs"), msg), status_code=303)

    @router.get("/deliveries", response_class=HTMLResponse)
    def deliveries(request: Request, state: str = "", destination: str = "") -> HTMLResponse:
        if state and state not in OUTBOX_STATES:
            raise HTTPException(422, f"state must be one of {', '.join(OUTBOX_STATES)}")
        e = engine(request)
        items = rows(e, state=state or None, destination=destination or None, limit=200)
        ids = {r.study_instance_uid: views.study_id_by_uid(e, r.study_instance_uid or "") for r in items}
        return render(
            request,
            "deliveries.html",
            items=items,
            state=state,
            states=OUTBOX_STATES,
            summary=outbox_status_data(e),
            study_ids=ids,
        )

    @router.post("/deliveries/{row_id}/retry")
    def delivery_retry(request: Request, row_id: int, next: str = Form("/deliveries")) -> Response:
        done = requeue(request.app.state.engine, ids=[row_id])
        msg = f"delivery {row_id} re-queued" if done else f"delivery {row_id} is not failed: nothing to retry"
        return RedirectResponse(_flash(_local_path(next, "/deliveries"), msg), status_code=303)

    @router.get("/batches", response_class=HTMLResponse)
    def batches(request: Request) -> HTMLResponse:
        return render(request, "batches.html", batches=list_batches(engine(request), 50), one=False)

    @router.get("/batches/{batch_id}", response_class=HTMLResponse)
    def batch(request: Request, batch_id: int) -> HTMLResponse:
        try:
            found = batch_status(engine(request), batch_id, failures=200)
        except KeyError:
            raise HTTPException(404, f"there is no batch {batch_id}") from None
        return render(request, "batches.html", batches=[found], one=True)

    @router.get("/rejections", response_class=HTMLResponse)
    def rejections(request: Request) -> HTMLResponse:
        e = engine(request)
        return render(
            request,
            "rejections.html",
            rejections=index_api.rejection_list(e, 200),
            duplicates=index_api.duplicate_list(e, 200),
        )

    @router.get("/rules", response_class=HTMLResponse)
    def rules_page(request: Request) -> HTMLResponse:
        return render(request, "rules.html", rules=_rules(request), result=None, studies=_recent(request))

    @router.post("/rules/dry-run", response_class=HTMLResponse)
    def rules_dry_run(request: Request, study_id: int = Form(...)) -> HTMLResponse:
        result = dry_run(request, study_id)
        return render(request, "rules.html", rules=_rules(request), result=result, studies=_recent(request))

    @router.get("/previews/{output_id}.png")
    def preview(request: Request, output_id: int) -> Response:
        e = engine(request)
        with Session(e) as s:
            out = s.get(JobOutput, output_id)
        if out is None:
            raise HTTPException(404, "no such output")
        storage = Storage(request.app.state.settings.storage.path)

        def source(uid: str) -> Path | None:
            with Session(e) as s:
                rel = s.exec(select(Instance.relpath).where(Instance.sop_instance_uid == uid)).first()
            return storage.path(rel) if rel else None

        try:
            if out.kind == "seg":
                png = seg_overlay_png(storage.path(out.relpath), source)
            elif out.kind in IMAGE_KINDS:
                png = thumbnail_png(storage.path(out.relpath))
            else:
                raise HTTPException(404, "this output kind has no image preview")
        except PreviewError as exc:
            raise HTTPException(422, str(exc)) from None
        except OSError as exc:
            raise HTTPException(410, f"the stored object cannot be read ({type(exc).__name__})") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    return router


def _flash(path: str, msg: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}flash={quote(msg)}"


def _relpath(engine: Any, output_id: int) -> str:
    with Session(engine) as s:
        out = s.get(JobOutput, output_id)
        if out is None:
            raise ValueError("no such output")
        return out.relpath


def _rules(request: Request) -> list[dict[str, Any]]:
    from dicom_node.routing import parse_rules

    return [r.model_dump(mode="json", exclude_defaults=True) for r in parse_rules(request.app.state.settings.rules)]


def _recent(request: Request) -> list[dict[str, Any]]:
    return index_api.study_summaries(request.app.state.read_engine, limit=50)


def dry_run(request: Request, study_id: int) -> dict[str, Any]:
    """What the effective rules would plan for a stored study (nothing is written)."""
    from dicom_node.jobs.planner import series_infos
    from dicom_node.routing import parse_rules, plan_study

    e = request.app.state.read_engine
    detail = index_api.study_detail(e, study_id)
    if detail is None:
        raise HTTPException(404, f"no study with id {study_id}")
    with Session(e) as s:
        infos = series_infos(s, detail["study_instance_uid"], detail["revision"], None)
    plan = plan_study(parse_rules(request.app.state.settings.rules), infos)
    by_uid = {i.series_instance_uid: i for i in infos}
    return {
        "study": detail,
        "tasks": [
            {
                "rule": t.rule,
                "kind": t.task.kind,
                "parameters": t.task.parameters(),
                "series": [f"{by_uid[u].modality} {by_uid[u].series_description}".strip() for u in t.series],
            }
            for t in plan.tasks
        ],
        "unmatched": [f"{by_uid[u].modality} {by_uid[u].series_description}".strip() for u in plan.unmatched_series],
    }
