"""The one gate every route passes: authentication, roles, CSRF and Origin checks.

Installed as an application-wide FastAPI dependency (so routers mounted later are covered too).
- Open without login: /healthz, /readyz, /metrics and the login form.
- Scripts authenticate with `Authorization: Bearer umv_...` (API token); browsers with the
  session cookie (HttpOnly, SameSite=Strict).
- Every state-changing request (anything but GET/HEAD/OPTIONS) is refused with 403 when it
  carries an Origin (or Referer) of another site, and, when authenticated by cookie, unless it
  carries the session's CSRF token (`X-CSRF-Token` header or `csrf_token` form field): the
  synchronizer-token pattern of the OWASP CSRF Prevention Cheat Sheet.
- State-changing requests need the admin role (read-only users only read), except logout.
- The worker role (remote workers' API tokens) reaches only WADO-RS retrieval (`GET /dicomweb/...`)
  and the upload of a job's outputs (`POST /api/jobs/{id}/outputs`, dicom_node.jobs.uploads).
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit

from fastapi import HTTPException, Request

from dicom_node.console.auth import Principal, same_token, session_principal, token_principal
from dicom_node.console.models import WORKER

SESSION_COOKIE = "unimedvl_session"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/login"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANY_ROLE_POSTS = frozenset({"/logout"})
WORKER_GET = re.compile(r"/dicomweb/studies/[^/]+(/series/[^/]+(/instances/[^/]+)?)?")
WORKER_POST = re.compile(r"/api/jobs/[0-9]+/outputs")


def worker_may(method: str, path: str) -> bool:
    """What the worker role may call: WADO-RS retrieval and job output uploads."""
    if method in ("GET", "HEAD"):
        return WORKER_GET.fullmatch(path) is not None
    return method == "POST" and WORKER_POST.fullmatch(path) is not None


def _origin_allowed(request: Request, allowed: list[str]) -> bool:
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # scripts (curl, httpx) send neither; browsers send Origin on every POST
    parts = urlsplit(origin)
    own = request.headers.get("host", "")
    if parts.netloc and parts.netloc == own:
        return True
    base = f"{parts.scheme}://{parts.netloc}"
    return base in {a.rstrip("/") for a in allowed}


def principal_of(request: Request) -> Principal | None:
    """The caller, from the bearer token or the session cookie (None when neither is valid)."""
    engine = request.app.state.read_engine
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return token_principal(engine, auth[7:].strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    return session_principal(engine, cookie) if cookie else None


async def guard(request: Request) -> None:
    """FastAPI dependency; raises 401/403 (API) or redirects to /login (pages)."""
    settings = request.app.state.settings
    path = request.url.path
    unsafe = request.method not in SAFE_METHODS
    if unsafe and not _origin_allowed(request, settings.console.allowed_origins):
        raise HTTPException(403, "cross-site request refused (Origin is not this console)")
    if path in OPEN_PATHS:
        return
    principal = principal_of(request)
    if principal is None:
        if path.startswith(("/api/", "/dicomweb/")) or unsafe:
            raise HTTPException(401, "login required", headers={"WWW-Authenticate": "Bearer"})
        raise HTTPException(303, "login required", headers={"Location": "/login?next=" + quote(path)})
    request.state.principal = principal
    if principal.role == WORKER and not worker_may(request.method, path):
        raise HTTPException(403, "a worker token may only retrieve stored instances and upload job outputs")
    if not unsafe:
        return
    if principal.via == "session":
        sent = request.headers.get("x-csrf-token")
        if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            form = await request.form()  # cached by Starlette: the route can still read it
            value = form.get("csrf_token")
            sent = value if isinstance(value, str) else None
        if not same_token(sent, principal.csrf_token):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    if path not in ANY_ROLE_POSTS and not principal.is_admin and principal.role != WORKER:
        raise HTTPException(403, f"user {principal.name} is read-only: this needs the admin role")


def current(request: Request) -> Principal:
    """The authenticated principal (set by `guard`)."""
    p = getattr(request.state, "principal", None)
    if p is None:  # pragma: no cover - guard runs first on every route
        raise HTTPException(401, "login required")
    return p
