"""Authentication, roles, CSRF and patient identifiers, over every route of the real app."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from dicom_node.console.auth import create_token
from dicom_node.db import make_engine
from tests.console.conftest import ADMIN, READER, login, make_app

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]
OPEN = {"/healthz", "/readyz", "/metrics", "/login"}
FOREIGN = "https://evil.example"


def _walk(routes: Any, prefix: str = "") -> list[tuple[str, set[str]]]:
    out: list[tuple[str, set[str]]] = []
    for r in routes:
        if isinstance(r, APIRoute):
            out.append((prefix + r.path, set(r.methods)))
        elif hasattr(r, "original_router"):  # FastAPI's lazily included router
            out += _walk(r.original_router.routes, prefix + (r.include_context.prefix or ""))
        elif hasattr(r, "methods"):
            out.append((prefix + r.path, set(r.methods or ())))
    return out


def _routes(app: Any, method: str) -> list[str]:
    """Every path of the app (routers included) that serves `method`."""
    return sorted({path for path, methods in _walk(app.routes) if method in methods})


def _fill(path: str, scenario: Any) -> str:
    path = path.replace("{job_id}", str(scenario.failed_job)).replace("{study_instance_uid}", scenario.study_uid)
    return re.sub(r"\{[a-z_]+\}", "1", path).replace("1.png", "1.png")


@pytest.fixture(scope="module")
def app(scenario: Any) -> Any:
    return make_app(scenario.settings)


def test_nothing_but_health_and_metrics_without_login(app: Any, scenario: Any) -> None:
    client = TestClient(app)
    gets = _routes(app, "GET")
    assert {"/api/jobs", "/api/studies", "/", "/studies/{study_id}", "/previews/{output_id}.png"} <= set(gets)
    for path in gets:
        r = client.get(_fill(path, scenario), follow_redirects=False)
        if path in OPEN:
            assert r.status_code in (200, 503), path
        elif path.startswith(("/api/", "/dicomweb/")):  # APIs answer 401, pages redirect
            assert r.status_code == 401, (path, r.status_code)
        else:
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), (path, r.status_code)
    # No unauthenticated schema or docs either (Starlette routes the guard would not cover).
    assert all(client.get(p).status_code == 404 for p in ("/docs", "/openapi.json", "/redoc"))


def test_every_state_changing_endpoint_needs_login_csrf_and_admin(app: Any, scenario: Any) -> None:
    posts = [p for p in _routes(app, "POST") if p not in ("/login", "/logout")]
    assert {"/api/jobs/{job_id}/retry", "/api/outbox/{row_id}/retry", "/jobs/{job_id}/retry", "/rules/dry-run"} <= set(
        posts
    )
    anonymous = TestClient(app)
    admin = TestClient(app)
    admin_csrf = login(admin, ADMIN)
    reader = TestClient(app)
    reader_csrf = login(reader, READER)
    for path in posts:
        url = _fill(path, scenario)
        assert anonymous.post(url).status_code == 401, path
        r = admin.post(url)  # logged in, no CSRF token
        assert r.status_code == 403 and "CSRF" in r.text, (path, r.status_code)
        r = admin.post(url, data={"csrf_token": "forged"})
        assert r.status_code == 403 and "CSRF" in r.text, path
        r = admin.post(url, headers={"Origin": FOREIGN, "X-CSRF-Token": admin_csrf})  # token stolen, wrong site
        assert r.status_code == 403 and "cross-site" in r.text, path
        r = reader.post(url, headers={"X-CSRF-Token": reader_csrf})
        assert r.status_code == 403 and "read-only" in r.text, path
    # logout is open to every role but not to a forged form either
    assert reader.post("/logout", headers={"Origin": FOREIGN}).status_code == 403
    assert reader.post("/logout").status_code == 403  # no CSRF token


def test_foreign_origin_cannot_rerun_a_job(app: Any, scenario: Any) -> None:
    """The reported case: a bare POST with a foreign Origin re-ran a job (HTTP 200)."""
    admin = TestClient(app)
    login(admin, ADMIN)
    before = admin.get(f"/api/jobs/{scenario.failed_job}").json()
    r = admin.post(f"/api/jobs/{scenario.failed_job}/retry", headers={"Origin": FOREIGN})
    assert r.status_code == 403
    after = admin.get(f"/api/jobs/{scenario.failed_job}").json()
    assert (after["state"], after["retries"]) == (before["state"], before["retries"]) == ("failed", before["retries"])


def test_api_tokens_for_scripts(app: Any, scenario: Any) -> None:
    engine = make_engine(scenario.settings.database.url)
    reader_token = create_token(engine, READER[0], "grafana")
    admin_token = create_token(engine, ADMIN[0], "nightly script")
    engine.dispose()
    client = TestClient(app)
    jobs = client.get("/api/jobs", headers={"Authorization": f"Bearer {reader_token}"})
    assert jobs.status_code == 200 and {j["state"] for j in jobs.json()} >= {"failed", "done"}
    assert client.get("/api/jobs", headers={"Authorization": "Bearer umv_not-a-token"}).status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Bearer "}).status_code == 401
    denied = client.post("/rules/dry-run", data={"study_id": 1}, headers={"Authorization": f"Bearer {reader_token}"})
    assert denied.status_code == 403
    # A bearer token is not ambient (a browser never sends it by itself): no CSRF token needed.
    plan = client.post("/rules/dry-run", data={"study_id": 1}, headers={"Authorization": f"Bearer {admin_token}"})
    assert plan.status_code == 200 and "ct-lesion" in plan.text and "cr-report" in plan.text


def test_login_logout_and_wrong_password(app: Any) -> None:
    client = TestClient(app)
    bad = client.post("/login", data={"username": ADMIN[0], "password": "wrong-password"})
    assert bad.status_code == 401 and "Wrong user name or password" in bad.text
    assert client.post("/login", data={"username": "nobody", "password": "x" * 12}).status_code == 401
    evil = client.post("/login", data={"username": ADMIN[0], "password": ADMIN[1]}, headers={"Origin": FOREIGN})
    assert evil.status_code == 403  # login CSRF: a foreign page cannot log the browser in
    csrf = login(client, ADMIN)
    cookie = client.cookies.get("unimedvl_session")
    assert cookie and client.get("/jobs").status_code == 200
    r = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    again = TestClient(app, cookies={"unimedvl_session": cookie})  # the old cookie is dead server-side
    assert again.get("/api/jobs").status_code == 401
    # open redirect: `next` must stay on this site
    r = client.post(
        "/login",
        data={"username": ADMIN[0], "password": ADMIN[1], "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert r.headers["location"] == "/"


def test_patient_identifiers_only_for_allowed_roles_never_in_urls_or_logs(
    app: Any, scenario: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from pydicom import dcmread
    from sqlmodel import Session, select

    from dicom_node.models import Patient

    engine = make_engine(scenario.settings.database.url)
    with Session(engine) as s:
        pat = s.exec(select(Patient)).first()
    engine.dispose()
    assert pat is not None and pat.patient_id
    secrets_ = [v for v in (pat.patient_id, str(pat.patient_name or "")) if v]
    caplog.set_level(logging.DEBUG)
    pages = ["/", "/studies", "/studies/1", "/jobs", "/deliveries", "/rejections", "/rules"]
    reader = TestClient(app)
    login(reader, READER)
    for p in pages:
        text = reader.get(p).text
        assert not any(v in text for v in secrets_), p
    assert reader.post("/studies/search", data={"patient": pat.patient_id}).status_code == 403
    admin = TestClient(app)
    csrf = login(admin, ADMIN)
    assert pat.patient_id in admin.get("/studies/1").text  # admin role may see them (console.phi_roles)
    found = admin.post("/studies/search", data={"patient": pat.patient_id, "csrf_token": csrf})
    assert found.status_code == 200 and scenario.study_uid in found.text
    for p in pages:
        html = admin.get(p).text
        for url in re.findall(r'(?:href|src|action)="([^"]*)"', html):
            assert not any(v in url for v in secrets_), (p, url)
    assert not any(v in rec.getMessage() for rec in caplog.records for v in secrets_)
    assert dcmread  # the scenario's sources carry the identifiers checked above


def test_production_example_is_safe_as_written() -> None:
    """deploy/unimedvl.example.toml: console on loopback (for a TLS proxy), secure cookies."""
    import ipaddress

    from dicom_node.config import load_config
    from tests.conftest import REPO

    s = load_config(REPO / "deploy" / "unimedvl.example.toml")
    assert ipaddress.ip_address(s.http.host).is_loopback
    assert s.console.cookie_secure and all(o.startswith("https://") for o in s.console.allowed_origins)
    compose = (REPO / "deploy" / "compose.yaml").read_text()
    assert '"8080:8080"' not in compose and "127.0.0.1:8080:8080" in compose
