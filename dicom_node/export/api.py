"""Status API routes for the outbox: list rows, counts per destination, re-queue a failed row.

Include with ``app.include_router(router)``. The routes read the engine from
``request.app.state.engine``; override the ``outbox_engine`` dependency to supply it otherwise.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel
from sqlalchemy.engine import Engine

from dicom_node.export.cli import outbox_status_data
from dicom_node.export.models import STATES, OutboxRow
from dicom_node.export.outbox import get_row, requeue, rows

router = APIRouter(prefix="/api/outbox", tags=["outbox"])


def outbox_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise HTTPException(503, "database engine not configured on app.state.engine")
    return engine


class OutboxItem(BaseModel):
    """One outbox row. last_status is the DICOM status (DIMSE, STOW FailureReason) or HTTP code of the
    last attempt; last_error says which, in words."""

    id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    warnings: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    size: int
    created_at: datetime
    updated_at: datetime
    done_at: datetime | None
    job_id: int | None
    fallback_of: int | None


def _item(r: OutboxRow) -> OutboxItem:
    return OutboxItem(
        id=r.id or 0,
        destination=r.destination,
        state=r.state,
        attempts=r.attempts,
        next_attempt_at=r.next_attempt_at,
        last_status=r.last_status,
        last_error=r.last_error,
        warnings=r.warnings,
        sop_instance_uid=r.sop_instance_uid,
        sop_class_uid=r.sop_class_uid,
        transfer_syntax_uid=r.transfer_syntax_uid,
        study_instance_uid=r.study_instance_uid,
        series_instance_uid=r.series_instance_uid,
        size=r.size,
        created_at=r.created_at,
        updated_at=r.updated_at,
        done_at=r.done_at,
        job_id=r.job_id,
        fallback_of=r.fallback_of,
    )


@router.get("", response_model=list[OutboxItem])
def list_outbox(
    state: str | None = Query(None, description=f"one of {', '.join(STATES)}"),
    destination: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    engine: Engine = Depends(outbox_engine),
) -> list[OutboxItem]:
    if state is not None and state not in STATES:
        raise HTTPException(422, f"state must be one of {', '.join(STATES)}")
    return [_item(r) for r in rows(engine, state=state, destination=destination, limit=limit, offset=offset)]


@router.get("/summary")
def outbox_summary(engine: Engine = Depends(outbox_engine)) -> dict[str, Any]:
    """Counts per destination and state, failed totals and the latest errors."""
    per_dest = outbox_status_data(engine)
    return {"destinations": per_dest, "failed": sum(d["failed"] for d in per_dest)}


@router.get("/{row_id}", response_model=OutboxItem)
def get_outbox_row(row_id: int, engine: Engine = Depends(outbox_engine)) -> OutboxItem:
    row = get_row(engine, row_id)
    if row is None:
        raise HTTPException(404, f"no outbox row {row_id}")
    return _item(row)


@router.post("/{row_id}/retry", response_model=OutboxItem)
def retry_outbox_row(row_id: int, engine: Engine = Depends(outbox_engine)) -> OutboxItem:
    row = get_row(engine, row_id)
    if row is None:
        raise HTTPException(404, f"no outbox row {row_id}")
    if not requeue(engine, ids=[row_id]):
        raise HTTPException(409, f"outbox row {row_id} is {row.state}; only failed rows can be re-queued")
    fresh = get_row(engine, row_id)
    assert fresh is not None
    return _item(fresh)
