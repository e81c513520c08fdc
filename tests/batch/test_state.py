"""Batch state in the database (SQLite and PostgreSQL): items before work, claims, leases,
fetch slots, the driver's hold for clinical jobs, the status JSON and its API route."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import Session, select

from dicom_node.batch.api import batch_router
from dicom_node.batch.deidentify import DeidOptions
from dicom_node.batch.driver import BatchError, BatchRequest, Driver, create_or_resume, enumerate_items
from dicom_node.batch.execute import FETCHING, claim, retry_or_fail, try_claim
from dicom_node.batch.models import FAILED, PENDING, QUEUED, BatchItem
from dicom_node.batch.results import batch_status
from dicom_node.batch.sources import FolderSource
from dicom_node.db import init_db, make_engine
from dicom_node.jobs.settings import utcnow
from tests.batch.conftest import make_archive


def _setup(tmp_path: Path, db_url: str, **kw: object):  # type: ignore[no-untyped-def]
    init_db(db_url)
    db = make_engine(db_url)
    root = tmp_path / "archive"
    studies = make_archive(root, n_cr=3, ct_slices=1, us=False)
    req = BatchRequest(source=str(root), out_dir=tmp_path / "out", rules=[], deidentify=DeidOptions(enabled=True), **kw)  # type: ignore[arg-type]
    batch, created = create_or_resume(db, req, "tiny")
    assert created
    n = enumerate_items(db, batch, FolderSource(root).studies(), lease_seconds=30)
    assert n == len(studies) == 4
    return db, batch, req


def test_items_claims_leases_and_fetch_slots(tmp_path: Path, db_url: str) -> None:
    db, batch, req = _setup(tmp_path, db_url, max_fetch=1)
    # The same request resumes the same batch; listing again adds nothing.
    again, created = create_or_resume(db, req, "tiny")
    assert not created and again.id == batch.id
    assert enumerate_items(db, again, FolderSource(Path(req.source)).studies()) == 4
    other = BatchRequest(source=req.source, out_dir=req.out_dir, rules=[{"name": "x", "tasks": []}])
    try:
        create_or_resume(db, other, "tiny")
        raise AssertionError("a second batch in the same DIR must be refused")
    except BatchError as exc:
        assert "another batch" in exc.reason
    with Session(db) as s:
        ids = [i.id for i in s.exec(select(BatchItem).order_by(BatchItem.id))]
    first = claim(db, ids[0], "w1", max_fetch=1)
    assert first is not None and first.item.state == FETCHING and first.item.attempts == 1
    assert try_claim(db, ids[0], "w2") is None  # held under a live lease: a duplicate message is ignored
    assert try_claim(db, ids[1], "w2", max_fetch=1) is False  # the one retrieval slot is taken
    assert retry_or_fail(db, first, "the PACS refused the association") == PENDING
    second = try_claim(db, ids[1], "w2", max_fetch=1)
    assert second  # the slot is free again
    # A worker that died: its lease runs out and the driver's sweep returns the item.
    with Session(db) as s:
        s.execute(update(BatchItem).where(BatchItem.id == ids[1]).values(lease_until=utcnow() - timedelta(seconds=1)))
        s.commit()
    published: list[int] = []
    driver = Driver(db, batch, published.append, window=2, retry_backoff=0.0)
    assert driver.sweep() == 1
    driver.step()
    assert len(published) == 2  # window 2: at most two in flight
    with Session(db) as s:
        states = {i.id: i.state for i in s.exec(select(BatchItem))}
    assert sorted(states.values()).count(QUEUED) == 2
    # Out of attempts -> failed with the reason.
    with Session(db) as s:
        s.execute(
            update(BatchItem).where(BatchItem.id == ids[3]).values(attempts=3, max_attempts=3, error="fetch failed")
        )
        s.commit()
    assert try_claim(db, ids[3], "w3") is None
    with Session(db) as s:
        gone = s.get(BatchItem, ids[3])
        assert gone is not None and gone.state == FAILED and "gave up after 3" in (gone.error or "")
    status = batch_status(db, batch.id)
    assert status["total"] == 4 and status["counts"]["failed"] == 1
    assert status["failures"][0]["reason"].startswith("gave up")
    app = FastAPI()
    app.include_router(batch_router(db))
    client = TestClient(app)
    assert client.get(f"/api/batches/{batch.id}").json()["counts"] == status["counts"]
    assert client.get("/api/batches/999").status_code == 404
    assert [b["id"] for b in client.get("/api/batches").json()] == [batch.id]
    db.dispose()


def test_driver_holds_batch_work_while_clinical_jobs_wait(tmp_path: Path, db_url: str) -> None:
    from dicom_node.jobs.models import Job

    db, batch, _ = _setup(tmp_path, db_url)
    now = utcnow()
    with Session(db) as s:
        job = Job(idempotency_key="k" * 64, study_instance_uid="1.2", revision=1, rule="r", kind="report")
        job.model_version, job.queue, job.state, job.created_at, job.updated_at = "tiny", "q", "queued", now, now
        s.add(job)
        s.commit()
    published: list[int] = []
    driver = Driver(db, batch, published.append, window=4)
    driver.step()
    assert published == [] and driver.held_for_clinical
    with Session(db) as s:
        s.execute(update(Job).values(state="running"))
        s.commit()
    driver.step()
    assert len(published) == 4 and not driver.held_for_clinical
    db.dispose()
