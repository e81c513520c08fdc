"""WADO-RS retrieval of stored instances (PS3.18 10.4), for remote workers and viewers.

    GET /dicomweb/studies/{study}
    GET /dicomweb/studies/{study}/series/{series}
    GET /dicomweb/studies/{study}/series/{series}/instances/{instance}

answer `multipart/related; type="application/dicom"` (PS3.18 8.6.1.2), one part per instance,
each the Part 10 file exactly as stored (no re-encoding), with its transfer syntax in the part's
Content-Type. Every request is looked up in the index; the files are opened at the relpath the
index recorded (dicom_node.storage.Storage.path), never at a path built from a received value.

Transfer syntax: the node serves what it stored, i.e. `transfer-syntax=*` (PS3.18 8.7.3.5.2);
an Accept naming another media type or a specific transfer syntax is answered 406 (we do not
transcode). Who may read: the guard (dicom_node.console.guard) has authenticated the caller;
these routes also need a role in `console.phi_roles` or the worker role, since instances carry
the patient's identity.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node.models import Instance, Series, Study
from dicom_node.storage import Storage

log = logging.getLogger("dicom_node.dicomweb")

CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredInstance:
    relpath: str
    sha256: str
    size: int
    transfer_syntax_uid: str


def stored_instances(
    engine: Engine, study_uid: str, series_uid: str | None = None, instance_uid: str | None = None
) -> list[StoredInstance]:
    """The index rows of a study (or one series, or one instance), in series / instance-number order."""
    query = (
        select(Instance.relpath, Instance.sha256, Instance.size, Instance.transfer_syntax_uid)
        .join(Study, col(Study.id) == Instance.study_pk)
        .join(Series, col(Series.id) == Instance.series_pk)
        .where(Study.study_instance_uid == study_uid)
    )
    if series_uid is not None:
        query = query.where(Series.series_instance_uid == series_uid)
    if instance_uid is not None:
        query = query.where(Instance.sop_instance_uid == instance_uid)
    query = query.order_by(col(Series.series_instance_uid), col(Instance.instance_number), col(Instance.id))
    with Session(engine) as s:
        return [StoredInstance(*row) for row in s.exec(query).all()]


def _accept_check(accept: str) -> None:
    """406 unless Accept allows multipart/related; type="application/dicom" as stored (PS3.18 8.7.3.5.2)."""
    if not accept.strip():
        return
    for item in accept.split(","):
        params = [p.strip() for p in item.split(";")]
        media = params[0].lower()
        if media in ("*/*", "multipart/*"):
            return
        if media != "multipart/related":
            continue
        kv = {}
        for p in params[1:]:
            key, _, value = p.partition("=")
            kv[key.strip().lower()] = value.strip().strip('"')
        if kv.get("type", "application/dicom").lower() == "application/dicom" and kv.get("transfer-syntax", "*") == "*":
            return
    raise HTTPException(
        406,
        'this node serves stored instances as Accept: multipart/related; type="application/dicom"; '
        "transfer-syntax=* (as stored, without transcoding)",
    )


def _multipart(storage: Storage, rows: list[StoredInstance], boundary: str) -> Iterator[bytes]:
    for r in rows:
        yield (
            f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={r.transfer_syntax_uid}\r\n"
            f"Content-Length: {r.size}\r\n\r\n"
        ).encode()
        with open(storage.path(r.relpath), "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def dicomweb_router(engine: Engine, storage: Callable[[], Storage], phi_roles: list[str]) -> APIRouter:
    from dicom_node.console.guard import current
    from dicom_node.console.models import WORKER

    router = APIRouter()

    def retrieve(
        request: Request, study: str, series: str | None = None, instance: str | None = None
    ) -> StreamingResponse:
        p = current(request)
        if p.role != WORKER and p.role not in phi_roles:
            raise HTTPException(403, f"user {p.name}'s role may not retrieve instances (they carry patient data)")
        _accept_check(request.headers.get("accept", ""))
        rows = stored_instances(engine, study, series, instance)
        what = "instance" if instance is not None else "series" if series is not None else "study"
        if not rows:
            raise HTTPException(404, f"no such {what} on this node")
        # Check before the first byte goes out: a missing file cannot become an error status later.
        for r in rows:
            if not storage().path(r.relpath).is_file():
                log.error("WADO-RS: a stored instance file is missing from storage (%s)", r.relpath)
                raise HTTPException(500, "a stored instance file is missing from the node's storage")
        log.info("WADO-RS %s: %d instance(s), %d bytes to %s", what, len(rows), sum(r.size for r in rows), p.name)
        boundary = f"unimedvl-{uuid.uuid4().hex}"
        return StreamingResponse(
            _multipart(storage(), rows, boundary),
            media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        )

    @router.get("/dicomweb/studies/{study}")
    def retrieve_study(request: Request, study: str) -> StreamingResponse:
        return retrieve(request, study)

    @router.get("/dicomweb/studies/{study}/series/{series}")
    def retrieve_series(request: Request, study: str, series: str) -> StreamingResponse:
        return retrieve(request, study, series)

    @router.get("/dicomweb/studies/{study}/series/{series}/instances/{instance}")
    def retrieve_instance(request: Request, study: str, series: str, instance: str) -> StreamingResponse:
        return retrieve(request, study, series, instance)

    return router
