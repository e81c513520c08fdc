"""Outbox semantics on SQLite and PostgreSQL: durable enqueue, idempotency, atomic claims,
crash recovery, backoff and the failed state."""

from __future__ import annotations

import hashlib
import random
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from dicom_node.export import (
    DONE,
    FAILED,
    PENDING,
    SENDING,
    EnqueueError,
    Exporter,
    ExportPolicy,
    OutboxRow,
    backoff_seconds,
    enqueue,
    requeue,
    summary,
)
from dicom_node.export.outbox import claim_due, recover_expired, utcnow
from tests.conftest import free_port
from tests.export.objects import ct_slices


def _rows(engine) -> list[OutboxRow]:
    with Session(engine) as s:
        return list(s.exec(select(OutboxRow).order_by(OutboxRow.id)))


def test_enqueue_stores_then_queues_and_is_idempotent(engine, storage, tmp_path: Path) -> None:
    ct = ct_slices(tmp_path / "ct", 1)[0]
    first = enqueue(engine, storage, ct, ["pacs", "web"])
    again = enqueue(engine, storage, ct, ["pacs"])
    rows = _rows(engine)
    assert len(rows) == 2, "same SOP Instance UID and destination must give one row"
    assert [r.id for r in again] == [first[0].id]
    row = rows[0]
    assert row.state == PENDING and row.attempts == 0
    assert row.sop_instance_uid == ct.SOPInstanceUID and row.study_instance_uid == ct.StudyInstanceUID
    data = storage.path(row.relpath).read_bytes()
    assert data[128:132] == b"DICM"
    assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size


def test_enqueue_rejects_what_cannot_be_delivered(engine, storage, tmp_path: Path) -> None:
    with pytest.raises(EnqueueError, match="not a DICOM file"):
        enqueue(engine, storage, b"this is not DICOM" * 20, ["pacs"])
    ct = ct_slices(tmp_path / "ct", 1)[0]
    del ct.SOPInstanceUID
    with pytest.raises(EnqueueError, match="SOPInstanceUID"):
        enqueue(engine, storage, ct, ["pacs"])
    assert _rows(engine) == []


def test_two_exporters_never_claim_the_same_row(engine, storage, tmp_path: Path) -> None:
    for ds in ct_slices(tmp_path / "ct", 12):
        enqueue(engine, storage, ds, ["pacs"])
    now = utcnow()
    claimed: list[list[int]] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        got: list[int] = []
        while True:
            _, rows = claim_due(engine, "pacs", now, limit=2, lease_seconds=60)
            if not rows:
                break
            got += [r.id for r in rows]
        claimed.append(got)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    flat = [i for got in claimed for i in got]
    assert len(flat) == 12 and len(set(flat)) == 12
    assert all(r.state == SENDING for r in _rows(engine))


def test_row_left_sending_is_recovered_after_its_lease(engine, storage, tmp_path: Path) -> None:
    enqueue(engine, storage, ct_slices(tmp_path / "ct", 1)[0], ["pacs"])
    t0 = utcnow()
    _, rows = claim_due(engine, "pacs", t0, limit=10, lease_seconds=30)
    assert len(rows) == 1  # ... and the exporter "crashes" here
    assert recover_expired(engine, t0 + timedelta(seconds=10)) == 0, "lease still valid"
    assert _rows(engine)[0].state == SENDING
    assert recover_expired(engine, t0 + timedelta(seconds=31)) == 1
    row = _rows(engine)[0]
    assert row.state == PENDING and row.claim_token is None and row.attempts == 0


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = ExportPolicy(backoff_initial_seconds=5, backoff_max_seconds=600)
    rng = random.Random(7)
    for attempts, base in [(1, 5), (2, 10), (3, 20), (8, 600), (20, 600)]:
        for _ in range(20):
            d = backoff_seconds(attempts, policy, rng)
            assert base / 2 <= d <= base


def test_unreachable_destination_retries_with_backoff_then_fails(engine, storage, make_settings, tmp_path) -> None:
    dead_port = free_port()  # nothing listens here: connection refused
    settings = make_settings(
        engine,
        [{"name": "pacs", "kind": "dimse", "ae_title": "NOBODY", "host": "127.0.0.1", "port": dead_port}],
        max_attempts=3,
        backoff_initial_seconds=10,
        backoff_max_seconds=15,
    )
    enqueue(engine, storage, ct_slices(tmp_path / "ct", 1)[0], ["pacs"])
    exporter = Exporter(settings, engine, storage)
    t0 = utcnow()

    r1 = exporter.run_once(t0)
    assert r1.retried == {"pacs": 1}
    row = _rows(engine)[0]
    assert row.state == PENDING and row.attempts == 1
    assert "Connection refused" in row.last_error and f"127.0.0.1:{dead_port}" in row.last_error
    wait1 = (row.next_attempt_at - t0).total_seconds()
    assert 5 <= wait1 <= 11, wait1  # initial 10 s with equal jitter

    assert exporter.run_once(t0 + timedelta(seconds=4)).attempted == 0, "backoff not respected"
    t1 = row.next_attempt_at
    exporter.run_once(t1)
    row = _rows(engine)[0]
    assert row.attempts == 2
    wait2 = (row.next_attempt_at - t1).total_seconds()
    assert 7.5 <= wait2 <= 16, wait2  # 20 s capped at 15, equal jitter

    r3 = exporter.run_once(row.next_attempt_at)
    assert r3.failed == {"pacs": 1}
    row = _rows(engine)[0]
    assert row.state == FAILED and row.attempts == 3
    assert row.last_error.startswith("gave up after 3 attempt(s): cannot associate with NOBODY@127.0.0.1")
    assert exporter.run_once(row.next_attempt_at + timedelta(hours=1)).attempted == 0, "failed rows stay failed"

    (s,) = summary(engine)
    assert s.destination == "pacs" and s.failed == 1 and s.counts[DONE] == 0
    assert "Connection refused" in s.last_errors[0][3]

    assert requeue(engine, all_failed=True, destination="other") == []
    assert requeue(engine, all_failed=True) == [row.id]
    row = _rows(engine)[0]
    assert row.state == PENDING and row.attempts == 0


def test_rows_for_an_unconfigured_destination_fail_clearly(engine, storage, make_settings, tmp_path) -> None:
    settings = make_settings(engine, [])
    enqueue(engine, storage, ct_slices(tmp_path / "ct", 1)[0], ["gone"])
    Exporter(settings, engine, storage).run_once()
    row = _rows(engine)[0]
    assert row.state == FAILED and "not in the configuration" in row.last_error


def test_enqueue_inside_the_callers_transaction(engine, storage, tmp_path: Path) -> None:
    """With a Session the caller commits: results and their outbox rows can share one transaction."""
    ct = ct_slices(tmp_path / "ct", 1)[0]
    with Session(engine) as s:
        (row,) = enqueue(s, storage, ct, ["pacs"])
        assert row.id is not None
        s.rollback()
    assert _rows(engine) == []
    with Session(engine) as s:
        enqueue(s, storage, ct, ["pacs"])
        s.commit()
    assert [r.sop_instance_uid for r in _rows(engine)] == [ct.SOPInstanceUID]


def test_batches_with_many_sop_classes_never_propose_more_than_128_contexts() -> None:
    from dicom_node.export.dimse import _chunks, _contexts_for
    from dicom_node.export.outcome import SendItem

    j2k, explicit = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"
    items = [SendItem(i, Path("x"), f"2.25.{i}", f"1.2.3.{i % 100}", j2k if i % 2 else explicit) for i in range(500)]
    chunks = _chunks(items)
    assert sum(len(c) for c in chunks) == 500 and len(chunks) > 1
    assert all(len(_contexts_for(c)) <= 128 for c in chunks)
