"""Status API routes for research batches, for the status page / console.

Mount with ``app.include_router(batch_router(engine))`` behind the console's login (the
payloads name items by id and carry no patient identifier, but batches are not public).

GET /api/batches               the latest batches, each as `batch_status`
GET /api/batches/{id}          one batch: counts per state, studies/hour, ETA, failures with reasons
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy.engine import Engine

from dicom_node.batch.results import batch_status, list_batches


def batch_router(engine: Engine) -> APIRouter:
    router = APIRouter()

    @router.get("/api/batches")
    def batches(limit: int = Query(20, ge=1, le=200)) -> list[dict[str, Any]]:
        return list_batches(engine, limit)

    @router.get("/api/batches/{batch_id}")
    def batch(batch_id: int) -> dict[str, Any]:
        try:
            return batch_status(engine, batch_id)
        except KeyError:
            raise HTTPException(404, f"no batch {batch_id}") from None

    return router
