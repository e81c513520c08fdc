"""The handler's cheaper paths give what the plain ones gave: routing tags read from the
encoding walk equal pydicom's, and one index batch counts like one transaction per instance."""

from __future__ import annotations

import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select

from dicom_node import ingest as ingest_mod
from dicom_node.db import init_db, make_engine
from dicom_node.ingest import Ingest, Outcome, Peer
from dicom_node.models import Series, Study, StudyRevision
from dicom_node.storage import Storage
from tests.node.conftest import Gate, make_ct

PEER = Peer("MODALITY", "UNIMEDVL", "127.0.0.1")


def _part10(ds: Any, ts: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = ts
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _variants() -> list[tuple[str, Any, str]]:
    plain = make_ct()
    latin = make_ct()
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "Müller^Jürgen"
    latin.StudyDescription = "thorax\\abdomen"  # multi-valued: kept as pydicom renders it
    latin.ImagesInAcquisition = "3"
    latin.AcquisitionNumber = "2"
    sparse = make_ct()
    del sparse.AccessionNumber, sparse.SeriesNumber, sparse.BodyPartExamined
    return [
        ("explicit", plain, ExplicitVRLittleEndian),
        ("implicit", make_ct(), ImplicitVRLittleEndian),
        ("charset", latin, ExplicitVRLittleEndian),
        ("sparse", sparse, ExplicitVRLittleEndian),
        ("big endian", make_ct(), ExplicitVRBigEndian),
    ]


@pytest.mark.parametrize(("name", "ds", "ts"), _variants(), ids=[v[0] for v in _variants()])
def test_routing_tags_from_the_walk_equal_pydicoms(name: str, ds: Any, ts: str, tmp_path: Path) -> None:
    data = _part10(ds, ts)
    path = tmp_path / "in.dcm"
    path.write_bytes(data)
    head = ingest_mod._part10_head_length(data)
    walked = ingest_mod.check_encoding(memoryview(data)[head:], ts, ingest_mod._COLLECT)
    assert walked is not None
    fast = ingest_mod._walked_dataset(data, head, walked, ts)
    # Big endian is left to dcmread; the little-endian syntaxes take the walk.
    assert (fast is None) == (ts == ExplicitVRBigEndian), name
    tags = ingest_mod.check_file(path, len(data), ts).tags
    assert tags == ingest_mod.parse_tags_from(BytesIO(data)), name
    assert tags.sop_instance_uid == ds.SOPInstanceUID and tags.patient_name == str(ds.PatientName)


def test_an_unknown_vr_leaves_the_data_set_to_pydicom(tmp_path: Path) -> None:
    """pydicom re-reads an element with a VR it does not know as implicit VR, so the walk's view
    of the data set may differ from pydicom's: the tags then come from dcmread."""
    ds = make_ct()
    data = bytearray(_part10(ds, ExplicitVRLittleEndian))
    at = data.index(b"\x08\x00\x60\x00CS")  # Modality (0008,0060): CS -> "QQ"
    data[at + 4 : at + 6] = b"QQ"
    head = ingest_mod._part10_head_length(bytes(data))
    walked = ingest_mod.check_encoding(memoryview(bytes(data))[head:], ExplicitVRLittleEndian, ingest_mod._COLLECT)
    assert walked is not None and walked.odd_vr
    assert ingest_mod._walked_dataset(bytes(data), head, walked, ExplicitVRLittleEndian) is None


def test_one_batch_counts_like_one_transaction_per_instance(db_url: str, tmp_path: Path) -> None:
    """Five instances of a series announcing five (ImagesInAcquisition): the first commits
    alone, four wait and commit in one batch. Revision, series and study counts are five and
    only the instance whose commit completed the series reports it (count_reached)."""
    init_db(db_url)
    engine = make_engine(db_url)
    ingest = Ingest(engine, Storage(tmp_path / "storage"), max_instance_bytes=1 << 30)
    gate = Gate()
    ingest.committer.lock = gate
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    files = []
    for n in range(1, 6):
        ds = make_ct(study, series, instance_number=n)
        ds.ImagesInAcquisition = 5
        path = ingest.storage.tmp_dir / f"{n}.rcv"
        path.write_bytes(_part10(ds, ExplicitVRLittleEndian))
        files.append(path)
    outcomes: dict[int, Outcome] = {}

    def receive(n: int) -> None:
        outcomes[n] = ingest.receive_file(files[n - 1], PEER, transfer_syntax_uid=ExplicitVRLittleEndian)

    try:
        gate.lock.acquire()
        first = threading.Thread(target=receive, args=(1,))
        first.start()
        assert gate.entered.wait(30)  # the leader waits at the gate with a batch of one
        rest = [threading.Thread(target=receive, args=(n,)) for n in range(2, 6)]
        for t in rest:
            t.start()
        for _ in range(3000):
            if ingest.committer._queue.qsize() == 4:  # noqa: SLF001 - all four wait for the leader
                break
            threading.Event().wait(0.01)
        gate.lock.release()
        for t in [first, *rest]:
            t.join(30)
    finally:
        ingest.close()
    assert sorted(outcomes) == [1, 2, 3, 4, 5] and {o.action for o in outcomes.values()} == {"stored"}
    assert ingest.committer.stats.largest == 4
    assert [n for n, o in outcomes.items() if o.count_reached] != [1]
    assert sum(o.count_reached for o in outcomes.values()) == 1
    with engine.connect() as conn:
        row = conn.execute(select(Series.instance_count, Series.count_known)).one()  # type: ignore[call-overload]
        assert tuple(row) == (5, True)
        assert conn.execute(select(Study.instance_count)).scalar_one() == 5  # type: ignore[call-overload]
        assert conn.execute(select(StudyRevision.instance_count)).scalar_one() == 5  # type: ignore[call-overload]
    engine.dispose()
