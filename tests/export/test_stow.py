"""STOW-RS response handling (PS3.18 store results in JSON and XML), damaged files, safe re-sends."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from dicom_node.export import DONE, FAILED, Exporter, OutboxRow, enqueue
from dicom_node.export.outbox import claim_due, utcnow
from dicom_node.export.stow import parse_json, parse_xml
from tests.export.conftest import dimse_destination, stow_destination
from tests.export.objects import ct_slices


def _rows(engine) -> list[OutboxRow]:
    with Session(engine) as s:
        return list(s.exec(select(OutboxRow).order_by(OutboxRow.id)))


def test_store_result_json_lists_stored_warned_and_failed_instances() -> None:
    doc = {
        "00081199": {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": ["1.2.3"]}},
                {"00081155": {"vr": "UI", "Value": ["1.2.4"]}, "00081196": {"vr": "US", "Value": [45056]}},
            ],
        },
        "00081198": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.5"]}, "00081197": {"vr": "US", "Value": [42752]}}],
        },
    }
    r = parse_json(doc)
    assert r.referenced == {"1.2.3": None, "1.2.4": 0xB000}
    assert r.failed == {"1.2.5": 0xA700}


def test_store_result_xml_is_read_too() -> None:
    xml = """<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
  <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID"><Value number="1">1.2.3</Value>
      </DicomAttribute>
    </Item>
  </DicomAttribute>
  <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID"><Value number="1">1.2.5</Value>
      </DicomAttribute>
      <DicomAttribute tag="00081197" vr="US" keyword="FailureReason"><Value number="1">43264</Value>
      </DicomAttribute>
    </Item>
  </DicomAttribute>
</NativeDicomModel>"""
    r = parse_xml(xml)
    assert r.referenced == {"1.2.3": None} and r.failed == {"1.2.5": 0xA900}


@pytest.mark.orthanc
@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_damaged_stored_file_is_never_sent(kind, sqlite_engine, storage, orthanc, make_settings, tmp_path) -> None:
    ct = ct_slices(tmp_path / "ct", 2)
    dest = dimse_destination(orthanc) if kind == "dimse" else stow_destination(orthanc)
    settings = make_settings(sqlite_engine, [dest])
    good, bad = (enqueue(sqlite_engine, storage, ds, [dest["name"]])[0] for ds in ct)
    path = storage.path(bad.relpath)
    data = bytearray(path.read_bytes())
    data[-100:] = bytes(100)  # a flipped tail: same size, different content
    path.write_bytes(bytes(data))

    Exporter(settings, sqlite_engine, storage).run_once()

    rows = {r.id: r for r in _rows(sqlite_engine)}
    assert rows[good.id].state == DONE
    assert rows[bad.id].state == FAILED and "does not match its sha256" in rows[bad.id].last_error
    assert orthanc.instance_uids() == [good.sop_instance_uid]


@pytest.mark.orthanc
def test_stow_resend_of_an_instance_the_pacs_already_has_counts_as_delivered(
    sqlite_engine, storage, orthanc, make_settings, tmp_path: Path
) -> None:
    ct = ct_slices(tmp_path / "ct", 3)
    settings = make_settings(sqlite_engine, [stow_destination(orthanc)])
    for ds in ct:
        enqueue(sqlite_engine, storage, ds, ["web"])
    exporter = Exporter(settings, sqlite_engine, storage)
    t0 = utcnow()
    # First exporter sends, then "crashes" before recording: emulate by sending and resetting the rows.
    exporter.run_once(t0)
    assert orthanc.count_instances() == 3
    with Session(sqlite_engine) as s:
        for r in s.exec(select(OutboxRow)):
            r.state, r.done_at = "pending", None
            s.add(r)
        s.commit()
    _, claimed = claim_due(sqlite_engine, "web", t0, limit=10, lease_seconds=60)
    assert len(claimed) == 3
    result = exporter.run_once(t0 + timedelta(minutes=2))  # lease expired: recovered and re-sent
    assert result.recovered == 3 and result.sent == {"web": 3}
    assert {r.state for r in _rows(sqlite_engine)} == {DONE}
    assert orthanc.count_instances() == 3
