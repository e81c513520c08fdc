"""C-STORE statuses from a real SCP (pynetdicom as a PACS that answers per instance), and the status API."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlmodel import Session, select

from dicom_node.export import DONE, FAILED, PENDING, Exporter, OutboxRow, enqueue
from dicom_node.export.api import router
from dicom_node.export.metrics import OutboxCollector
from dicom_node.export.outbox import recover_expired, utcnow
from dicom_node.metrics import app_registry
from tests.conftest import free_port
from tests.export.objects import ct_slices


def _rows(engine) -> list[OutboxRow]:
    with Session(engine) as s:
        return list(s.exec(select(OutboxRow).order_by(OutboxRow.id)))


class ScriptedPACS:
    """A pynetdicom Storage SCP answering a scripted status sequence per SOP Instance UID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.script: dict[str, list[int]] = {}
        self.received: list[str] = []
        self.delay = 0.0  # seconds before answering each C-STORE (a slow PACS)
        self.ae = AE("SCRIPTED")
        self.ae.supported_contexts = StoragePresentationContexts

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.received.append(uid)
        time.sleep(self.delay)
        statuses = self.script.get(uid, [])
        return statuses.pop(0) if statuses else 0x0000

    def __enter__(self) -> ScriptedPACS:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


@pytest.fixture
def scripted() -> Iterator[ScriptedPACS]:
    with ScriptedPACS() as pacs:
        yield pacs


def _metric(name: str, dest: str) -> float:
    return REGISTRY.get_sample_value(f"unimedvl_export_{name}_total", {"destination": dest}) or 0.0


def test_statuses_warning_permanent_and_transient(
    sqlite_engine, storage, scripted: ScriptedPACS, make_settings, tmp_path: Path
) -> None:
    ct = ct_slices(tmp_path / "ct", 4)
    uids = [str(d.SOPInstanceUID) for d in ct]
    scripted.script = {
        uids[0]: [0xB000],  # coercion of data elements: delivered, counted as a warning
        uids[1]: [0xA900],  # data set does not match SOP class: permanent, failed at once
        uids[2]: [0xA701, 0x0000],  # out of resources once: retried, then delivered
    }
    dest = {"name": "scripted", "kind": "dimse", "ae_title": "SCRIPTED", "host": "127.0.0.1", "port": scripted.port}
    settings = make_settings(sqlite_engine, [dest], max_attempts=5, backoff_initial_seconds=1)
    for ds in ct:
        enqueue(sqlite_engine, storage, ds, ["scripted"])
    before = {k: _metric(k, "scripted") for k in ("sent", "warnings", "retries", "failed")}

    exporter = Exporter(settings, sqlite_engine, storage)
    t0 = utcnow()
    first = exporter.run_once(t0)
    assert first.sent == {"scripted": 2} and first.warnings == {"scripted": 1}
    assert first.failed == {"scripted": 1} and first.retried == {"scripted": 1}
    warned, bad, transient, plain = _rows(sqlite_engine)
    assert warned.state == DONE and warned.warnings == 1 and warned.last_status == 0xB000
    assert "0xB000 Coercion of Data Elements" in warned.last_error
    assert bad.state == FAILED and bad.attempts == 1 and bad.last_status == 0xA900
    assert "Data Set Does Not Match SOP Class" in bad.last_error
    assert transient.state == PENDING and transient.last_status == 0xA701
    assert plain.state == DONE and plain.last_status == 0 and plain.last_error is None

    exporter.run_once(t0 + (transient.next_attempt_at - t0))
    transient = _rows(sqlite_engine)[2]
    assert transient.state == DONE and transient.attempts == 2
    assert scripted.received.count(uids[2]) == 2 and scripted.received.count(uids[1]) == 1
    after = {k: _metric(k, "scripted") for k in before}
    assert {k: after[k] - before[k] for k in after} == {"sent": 3, "warnings": 1, "retries": 1, "failed": 1}


def test_status_api_lists_counts_and_requeues(sqlite_engine, storage, make_settings, tmp_path: Path) -> None:
    dead = {"name": "pacs", "kind": "dimse", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}
    settings = make_settings(sqlite_engine, [dead], max_attempts=1)
    ct = ct_slices(tmp_path / "ct", 2)
    for ds in ct:
        enqueue(sqlite_engine, storage, ds, ["pacs"])
    Exporter(settings, sqlite_engine, storage).run_once()

    app = FastAPI()
    app.state.engine = sqlite_engine
    app.include_router(router)
    client = TestClient(app)

    listed = client.get("/api/outbox", params={"state": "failed"}).json()
    assert [r["state"] for r in listed] == ["failed", "failed"]
    assert "Connection refused" in listed[0]["last_error"]
    assert client.get("/api/outbox", params={"state": "bogus"}).status_code == 422
    summary = client.get("/api/outbox/summary").json()
    assert summary["failed"] == 2 and summary["destinations"][0]["counts"]["failed"] == 2

    row_id = listed[0]["id"]
    retried = client.post(f"/api/outbox/{row_id}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "pending" and retried.json()["attempts"] == 0
    assert client.post(f"/api/outbox/{row_id}/retry").status_code == 409
    assert client.post("/api/outbox/999999/retry").status_code == 404
    assert client.get(f"/api/outbox/{row_id}").json()["state"] == "pending"

    registry = app_registry(OutboxCollector(sqlite_engine))
    gauge = {
        s: registry.get_sample_value("unimedvl_outbox_rows", {"destination": "pacs", "state": s})
        for s in ("pending", "failed", "done")
    }
    assert gauge == {"pending": 1, "failed": 1, "done": 0}


def test_unimedvl_status_and_retry_show_and_requeue_outbox_rows(
    sqlite_engine, storage, make_settings, tmp_path: Path
) -> None:
    """Through the real `unimedvl` app: `status` includes the outbox, `retry` re-queues by id."""
    from typer.testing import CliRunner

    from dicom_node.cli import app

    dead = {"name": "pacs", "kind": "dimse", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}
    settings = make_settings(sqlite_engine, [dead], max_attempts=1)
    (row,) = enqueue(sqlite_engine, storage, ct_slices(tmp_path / "ct", 1)[0], ["pacs"])
    Exporter(settings, sqlite_engine, storage).run_once()
    cfg = str(tmp_path / "unimedvl.toml")
    runner = CliRunner()
    shown = runner.invoke(app, ["status", "--config", cfg], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "Outbox" in shown.output and "Connection refused" in shown.output and f"#{row.id}" in shown.output
    res = runner.invoke(app, ["retry", str(row.id), "--config", cfg])
    assert res.exit_code == 0 and f"re-queued 1 row(s): {row.id}" in res.output, res.output
    again = runner.invoke(app, ["retry", str(row.id), "--config", cfg])
    assert "not re-queued" in again.output
    assert _rows(sqlite_engine)[0].state == PENDING


def test_lease_is_renewed_while_a_slow_batch_is_sending(
    sqlite_engine, storage, scripted: ScriptedPACS, make_settings, tmp_path: Path
) -> None:
    """A batch that takes longer than the lease is not mistaken for an abandoned one (no double send)."""
    scripted.delay = 0.25
    dest = {"name": "slow", "kind": "dimse", "ae_title": "SCRIPTED", "host": "127.0.0.1", "port": scripted.port}
    settings = make_settings(sqlite_engine, [dest])
    for ds in ct_slices(tmp_path / "ct", 4):
        enqueue(sqlite_engine, storage, ds, ["slow"])
    exporter = Exporter(settings, sqlite_engine, storage)
    exporter.policy = dataclasses.replace(exporter.policy, lease_seconds=0.3)
    worker = threading.Thread(target=exporter.run_once)
    worker.start()
    recovered = 0
    while worker.is_alive():  # a second exporter looking for abandoned rows the whole time
        recovered += recover_expired(sqlite_engine, utcnow())
        time.sleep(0.05)
    worker.join()
    assert recovered == 0
    assert {r.state for r in _rows(sqlite_engine)} == {DONE}
    assert len(scripted.received) == 4 == len(set(scripted.received))
