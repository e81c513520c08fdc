"""The node's side of remote workers' outputs: `POST /api/jobs/{id}/outputs`.

A worker without the node's disk (dicom_node.jobs.remote) sends, as multipart/form-data:
- `claim_token`: the token its claim got (dicom_node.jobs.runner.claim);
- `result`: JSON `{"summary": ..., "model_info": {...}, "outputs": [{"kind", "source_series_uid",
  "sha256"}, ...]}`, one entry per object, in the order of
- `object` file parts: each output as the Part 10 bytes the worker encoded.

The node checks each object's sha256 and that it is a Part 10 file with the identifiers an outbox
row needs, then calls `dicom_node.jobs.runner.commit_outputs`, the same code a local worker runs:
files written to the node's storage (fsync + rename), then ONE transaction of output rows +
outbox rows + job done, only while the claim token still holds the job. The node's own
`[[destinations]]` (or the job's `destinations` parameter) decide where the outputs go.

Answers: 200 with the recorded outputs; 200 with `"already_recorded": true` when this same
claim already recorded them (a retried upload whose first answer was lost: nothing twice);
409 when the claim moved on (stale token: another worker holds or finished the job); 404 for
an unknown job; 422 for a malformed upload, with a sentence saying what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from starlette.datastructures import UploadFile

from dicom_node.export.outbox import EnqueueError, part10_bytes
from dicom_node.jobs.models import DONE, RUNNING, Job, JobOutput
from dicom_node.jobs.runner import EncodedOutput, commit_outputs, job_destinations
from dicom_node.storage import Storage

log = logging.getLogger("dicom_node.jobs.uploads")

MAX_OBJECTS = 20_000  # form parts per upload (one per output object)


def _output_dict(o: JobOutput) -> dict[str, Any]:
    return {"sop_instance_uid": o.sop_instance_uid, "kind": o.kind, "sha256": o.sha256, "size": o.size}


def _stale(job: Job) -> HTTPException:
    return HTTPException(
        409,
        f"job {job.id} is {job.state} under another claim (attempt {job.attempts}): "
        "this upload's claim token is stale, so its outputs were not recorded",
    )


def _claim_state(engine: Engine, job_id: int, token: str) -> tuple[Job, list[JobOutput] | None]:
    """The job, and its recorded outputs if this very claim already recorded them.

    Raises 404 for an unknown job, 409 when the token does not hold the job."""
    with Session(engine, expire_on_commit=False) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id} on this node")
        if job.claim_token != token or job.state not in (RUNNING, DONE):
            raise _stale(job)
        if job.state == DONE:
            return job, list(s.exec(select(JobOutput).where(JobOutput.job_id == job_id).order_by(JobOutput.id)))
        return job, None


def _parse(result: Any, files: list[Any]) -> tuple[list[EncodedOutput], str | None, dict[str, Any] | None]:
    if not isinstance(result, str):
        raise HTTPException(422, "the upload has no `result` JSON field")
    try:
        meta = json.loads(result)
    except ValueError:
        raise HTTPException(422, "the `result` field is not valid JSON") from None
    entries = meta.get("outputs") if isinstance(meta, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise HTTPException(422, "`result` must be an object with an `outputs` list")
    if len(entries) != len(files):
        raise HTTPException(422, f"`result` lists {len(entries)} output(s) but {len(files)} object part(s) came")
    summary, model_info = meta.get("summary"), meta.get("model_info")
    if summary is not None and not isinstance(summary, str):
        raise HTTPException(422, "`summary` must be a string")
    if model_info is not None and not isinstance(model_info, dict):
        raise HTTPException(422, "`model_info` must be an object")
    encoded = []
    for i, (entry, data) in enumerate(zip(entries, files, strict=True), start=1):
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise HTTPException(422, f"object {i} does not match its sha256: it was damaged on the way")
        kind, source = entry.get("kind"), entry.get("source_series_uid")
        if not isinstance(kind, str) or not kind or (source is not None and not isinstance(source, str)):
            raise HTTPException(422, f"output {i} needs a `kind` string (and `source_series_uid` a string or null)")
        try:
            part10, header = part10_bytes(data)
        except EnqueueError as exc:
            raise HTTPException(422, f"object {i} is not a DICOM Part 10 file: {exc}") from None
        if part10 != data:
            raise HTTPException(422, f"object {i} is not a DICOM Part 10 file (no preamble and DICM prefix)")
        encoded.append(EncodedOutput(data, header, kind, source))
    return encoded, summary, model_info


def uploads_router(engine: Engine, storage: Callable[[], Storage], destinations: list[str]) -> APIRouter:
    """`destinations`: the node's configured destination names (a job's own parameter wins)."""
    router = APIRouter()

    @router.post("/api/jobs/{job_id}/outputs")
    async def upload_outputs(job_id: int, request: Request) -> dict[str, Any]:
        form = await request.form(max_files=MAX_OBJECTS, max_fields=16)
        token = form.get("claim_token")
        if not isinstance(token, str) or not token:
            raise HTTPException(422, "the upload has no `claim_token` field")
        job, already = await run_in_threadpool(_claim_state, engine, job_id, token)
        if already is not None:
            log.info("job %s: outputs uploaded again by the claim that recorded them; nothing recorded twice", job_id)
            return {"job_id": job_id, "already_recorded": True, "outputs": [_output_dict(o) for o in already]}
        parts = form.getlist("object")
        if not all(isinstance(p, UploadFile) for p in parts):
            raise HTTPException(422, "`object` parts must be files")
        files = [await p.read() for p in parts]  # type: ignore[union-attr]
        encoded, summary, model_info = _parse(form.get("result"), files)

        def commit() -> list[JobOutput] | None:
            return commit_outputs(
                engine,
                storage(),
                job_id,
                token,
                encoded,
                job_destinations(destinations, job),
                summary=summary,
                model_info=model_info,
            )

        try:
            recorded = await run_in_threadpool(commit)
        except EnqueueError as exc:
            raise HTTPException(422, f"an output object cannot be queued for delivery: {exc}") from None
        if recorded is None:
            with Session(engine) as s:
                latest = s.get(Job, job_id)
            log.warning("job %s: a remote worker's upload came after its claim moved on; not recorded", job_id)
            raise _stale(latest or job)
        log.info("job %s done: %d output object(s) uploaded by a remote worker", job_id, len(recorded))
        return {"job_id": job_id, "already_recorded": False, "outputs": [_output_dict(o) for o in recorded]}

    return router
