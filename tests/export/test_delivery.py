"""Delivery to a real PACS (Orthanc with the DICOMweb plugin) over DIMSE and STOW-RS."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from sqlmodel import Session, select

from benchmarks.peers import StoreSCP, storescu_send
from dicom_node.export import DONE, FAILED, PENDING, SUPERSEDED, Exporter, OutboxRow, enqueue
from dicom_node.export.outbox import claim_due, utcnow
from tests.conftest import require_tool
from tests.export.conftest import dimse_destination, stow_destination
from tests.export.objects import (
    basic_text_sr,
    ct_slices,
    labelmap_to_binary_converter,
    secondary_capture,
    seg,
)

pytestmark = pytest.mark.orthanc


def _rows(engine) -> list[OutboxRow]:
    with Session(engine) as s:
        return list(s.exec(select(OutboxRow).order_by(OutboxRow.id)))


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_every_kind_of_result_arrives_in_the_source_study(
    kind, sqlite_engine, storage, orthanc, make_settings, tmp_path: Path
) -> None:
    ct = ct_slices(tmp_path / "ct", 2)
    objects = [*ct, basic_text_sr(ct[0]), seg(ct), secondary_capture(ct[0])]
    dest = dimse_destination(orthanc) if kind == "dimse" else stow_destination(orthanc)
    settings = make_settings(sqlite_engine, [dest])
    for ds in objects:
        enqueue(sqlite_engine, storage, ds, [dest["name"]])
    assert orthanc.count_instances() == 0, "nothing may be sent at enqueue time"

    result = Exporter(settings, sqlite_engine, storage).run_once()

    assert result.sent == {dest["name"]: len(objects)}
    rows = _rows(sqlite_engine)
    assert {r.state for r in rows} == {DONE} and all(r.attempts == 1 and r.done_at for r in rows)
    study_uid = str(ct[0].StudyInstanceUID)
    assert sorted(orthanc.study_instances(study_uid)) == sorted(str(d.SOPInstanceUID) for d in objects)
    assert orthanc.count_instances() == len(objects)
    # Sending again is harmless: same SOP Instance UIDs, the PACS keeps one copy each.
    assert Exporter(settings, sqlite_engine, storage).run_once().attempted == 0


def test_pacs_killed_mid_export_is_retried_and_nothing_is_duplicated(
    engine, storage, orthanc, make_settings, tmp_path: Path
) -> None:
    ct = ct_slices(tmp_path / "ct", 24)  # 24 rows: sent over 3 parallel associations
    settings = make_settings(engine, [dimse_destination(orthanc, timeout_seconds=2)], max_attempts=50)
    for ds in ct:
        enqueue(engine, storage, ds, ["pacs"])
    killed = threading.Event()
    delivered: list[str] = []

    def kill_after_three(dest: str, item, outcome) -> None:
        if outcome.delivered:
            delivered.append(item.sop_instance_uid)
        if len(delivered) == 3 and not killed.is_set():
            orthanc.kill()  # the PACS vanishes in the middle of the association
            killed.set()

    exporter = Exporter(settings, engine, storage, on_result=kill_after_three)
    stop = threading.Event()
    thread = threading.Thread(target=exporter.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        assert killed.wait(30)
        deadline = time.monotonic() + 30
        while not any(r.attempts >= 2 and r.state == PENDING for r in _rows(engine)):
            assert time.monotonic() < deadline, "no retry happened while the PACS was down"
            time.sleep(0.05)
        orthanc.restart()
        deadline = time.monotonic() + 60
        while any(r.state != DONE for r in _rows(engine)):
            assert time.monotonic() < deadline, [(r.state, r.last_error) for r in _rows(engine)]
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=30)
    rows = _rows(engine)
    assert max(r.attempts for r in rows) >= 2
    assert orthanc.count_instances() == len(ct)
    assert sorted(orthanc.study_instances(str(ct[0].StudyInstanceUID))) == sorted(str(d.SOPInstanceUID) for d in ct)


def test_exporter_crash_leaves_rows_that_a_restart_delivers(
    engine, storage, orthanc, make_settings, tmp_path: Path
) -> None:
    ct = ct_slices(tmp_path / "ct", 3)
    settings = make_settings(engine, [dimse_destination(orthanc)])
    for ds in ct:
        enqueue(engine, storage, ds, ["pacs"])
    t0 = utcnow()
    _, claimed = claim_due(engine, "pacs", t0, limit=10, lease_seconds=900)  # an exporter claims, then dies
    assert len(claimed) == 3
    exporter = Exporter(settings, engine, storage)
    assert exporter.run_once(t0 + timedelta(minutes=1)).attempted == 0, "rows under a live lease are left alone"
    result = exporter.run_once(t0 + timedelta(minutes=16))
    assert result.recovered == 3 and result.sent == {"pacs": 3}
    assert orthanc.count_instances() == 3


def test_full_pacs_gives_failed_state_with_status_and_retry_delivers(
    sqlite_engine, storage, orthanc_factory, make_settings, tmp_path: Path
) -> None:
    """Orthanc with room for one patient, that patient protected: every store is refused (0xA700)."""
    from typer.testing import CliRunner

    from dicom_node.export.cli import register

    orthanc = orthanc_factory(extra_config={"MaximumPatientCount": 1})
    first = ct_slices(tmp_path / "a", 1, seed=1)
    first[0].save_as(tmp_path / "a.dcm")
    assert storescu_send([tmp_path / "a.dcm"], orthanc.host, orthanc.dicom_port, orthanc.aet).ok
    patient = orthanc.get("/patients")[0]
    httpx.put(f"{orthanc.url}/patients/{patient}/protected", content="1").raise_for_status()

    other = ct_slices(tmp_path / "b", 1, seed=2)[0]
    other.PatientID = "OTHER"
    settings = make_settings(
        sqlite_engine,
        [dimse_destination(orthanc), stow_destination(orthanc)],
        max_attempts=2,
        backoff_initial_seconds=0.01,
    )
    enqueue(sqlite_engine, storage, other, ["pacs", "web"])
    exporter = Exporter(settings, sqlite_engine, storage)
    now = utcnow()
    for _ in range(2):
        exporter.run_once(now)
        now = max(r.next_attempt_at for r in _rows(sqlite_engine))
    dimse_row, web_row = _rows(sqlite_engine)
    assert dimse_row.state == FAILED and dimse_row.attempts == 2
    assert dimse_row.last_status == 0xA700
    assert "0xA700 Refused: Out of Resources" in dimse_row.last_error
    # Orthanc's STOW-RS answers 200 with an empty ReferencedSOPSequence: not confirmed, never "done".
    assert web_row.state == FAILED and web_row.last_status == 200
    assert "did not confirm" in web_row.last_error

    cfg = tmp_path / "unimedvl.toml"
    app = __import__("typer").Typer()
    register(app, status_name="outbox")
    runner = CliRunner()
    shown = runner.invoke(app, ["outbox", "--config", str(cfg)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "Out of Resources" in shown.output and "failed" in shown.output

    # The operator frees the PACS, then re-queues the failed deliveries.
    httpx.put(f"{orthanc.url}/patients/{patient}/protected", content="0").raise_for_status()
    res = runner.invoke(app, ["retry", "--all-failed", "--destination", "pacs", "--config", str(cfg)])
    assert res.exit_code == 0 and "re-queued 1 row(s)" in res.output, res.output
    assert [r.state for r in _rows(sqlite_engine)] == [PENDING, FAILED]
    exporter.run_once()
    dimse_row = _rows(sqlite_engine)[0]
    assert dimse_row.state == DONE and dimse_row.attempts == 1 and dimse_row.last_status == 0
    assert orthanc.study_instances(str(other.StudyInstanceUID)) == [str(other.SOPInstanceUID)]


def test_labelmap_refused_by_pacs_is_rerendered_as_binary(
    sqlite_engine, storage, orthanc, make_settings, tmp_path: Path
) -> None:
    """Orthanc 1.10 does not know Label Map Segmentation Storage (66.7) and refuses its context."""
    ct = ct_slices(tmp_path / "ct", 2)
    labelmap = seg(ct, labelmap=True)
    # "pacs" claims to take LABELMAP (labelmap = true), so the exporter offers it and gets refused.
    settings = make_settings(sqlite_engine, [dimse_destination(orthanc, labelmap=True)])
    (lm_row,) = enqueue(sqlite_engine, storage, labelmap, ["pacs"])

    # Without a re-renderer: a clear failed state, nothing sent.
    Exporter(settings, sqlite_engine, storage).run_once()
    row = _rows(sqlite_engine)[0]
    assert row.state == FAILED and "refuses Label Map Segmentation" in row.last_error
    assert "no presentation context" in row.last_error
    assert orthanc.count_instances() == 0

    from dicom_node.export import requeue

    requeue(sqlite_engine, ids=[lm_row.id])
    exporter = Exporter(settings, sqlite_engine, storage, fallback=labelmap_to_binary_converter(ct))
    exporter.run_once()
    original, binary = _rows(sqlite_engine)
    assert original.state == SUPERSEDED and f"outbox row {binary.id}" in original.last_error
    assert binary.fallback_of == original.id and binary.state == DONE
    assert binary.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4"
    (stored,) = orthanc.study_instance_ids(str(ct[0].StudyInstanceUID))
    tags = orthanc.instance_tags(stored)
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.66.4" and tags["SegmentationType"] == "BINARY"


def test_labelmap_to_a_destination_configured_without_labelmap_is_converted_before_sending(
    sqlite_engine, storage, orthanc, make_settings, tmp_path: Path
) -> None:
    ct = ct_slices(tmp_path / "ct", 2)
    settings = make_settings(sqlite_engine, [dimse_destination(orthanc)])  # labelmap defaults to false
    enqueue(sqlite_engine, storage, seg(ct, labelmap=True), ["pacs"])
    Exporter(settings, sqlite_engine, storage, fallback=labelmap_to_binary_converter(ct)).run_once()
    original, binary = _rows(sqlite_engine)
    assert original.state == SUPERSEDED and "labelmap = false" in original.last_error
    assert binary.state == DONE and binary.fallback_of == original.id
    assert orthanc.instance_uids() == [binary.sop_instance_uid]


def test_compressed_object_goes_uncompressed_to_a_pacs_that_takes_only_little_endian(
    sqlite_engine, storage, orthanc_factory, make_settings, tmp_path: Path
) -> None:
    orthanc = orthanc_factory(
        dicomweb=False, extra_config={"AcceptedTransferSyntaxes": [ImplicitVRLittleEndian, ExplicitVRLittleEndian]}
    )
    ct = ct_slices(tmp_path / "ct", 2)
    pixels = [d.pixel_array.copy() for d in ct]
    ct[0].compress(JPEG2000Lossless, generate_instance_uid=False)
    expected = {str(d.SOPInstanceUID): p for d, p in zip(ct, pixels, strict=True)}
    settings = make_settings(sqlite_engine, [dimse_destination(orthanc)])
    for ds in ct:
        enqueue(sqlite_engine, storage, ds, ["pacs"])
    assert _rows(sqlite_engine)[0].transfer_syntax_uid == JPEG2000Lossless

    assert Exporter(settings, sqlite_engine, storage).run_once().sent == {"pacs": 2}
    assert {r.state for r in _rows(sqlite_engine)} == {DONE}
    for oid in orthanc.instances():
        received = dcmread(BytesIO(orthanc.instance_file(oid)))
        assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(received.pixel_array, expected[str(received.SOPInstanceUID)])


@pytest.mark.dcmtk
def test_implicit_only_scp_gets_implicit_vr(sqlite_engine, storage, make_settings, tmp_path: Path) -> None:
    """DCMTK storescp +xi accepts Implicit VR Little Endian only; our files are Explicit."""
    require_tool("storescp")
    ct = ct_slices(tmp_path / "ct", 2)
    with StoreSCP(tmp_path / "scp", extra_args=["+xi"]) as scp:
        dest = {"name": "scp", "kind": "dimse", "ae_title": scp.aet, "host": scp.host, "port": scp.port}
        settings = make_settings(sqlite_engine, [dest])
        for ds in ct:
            enqueue(sqlite_engine, storage, ds, ["scp"])
        assert Exporter(settings, sqlite_engine, storage).run_once().sent == {"scp": 2}
        files = scp.received_files()
    assert len(files) == 2
    assert {str(dcmread(f).file_meta.TransferSyntaxUID) for f in files} == {ImplicitVRLittleEndian}
