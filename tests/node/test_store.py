"""C-STORE over the network into a running node, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import subprocess
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import _config
from pynetdicom.presentation import build_context
from sqlmodel import Session, select

from dicom_node.models import DuplicateEvent, Instance, Patient, Rejection, Series, Study
from tests.conftest import require_tool
from tests.node.conftest import make_ct, storage_files, store

OBJECT_NAME = r"objects/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}\.dcm"


def _instances(node: Any) -> list[Instance]:
    with Session(node.engine) as s:
        return list(s.exec(select(Instance)).all())


def _rejections(node: Any) -> list[Rejection]:
    with Session(node.engine) as s:
        return list(s.exec(select(Rejection).order_by(Rejection.id)).all())


def _assert_stored_exactly(node: Any, root: Path, n: int) -> None:
    rows = _instances(node)
    assert len(rows) == n
    objects = [p for p in storage_files(root) if "objects" in p.parts]
    assert len(objects) == n
    for r in rows:
        p = root / r.relpath
        assert p.is_file()
        assert hashlib.sha256(p.read_bytes()).hexdigest() == r.sha256
        assert p.stat().st_size == r.size
    assert not list((root / "tmp").iterdir()), "temp files left behind"


def test_pynetdicom_store_indexes_study(db_url: str, make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    settings = make_settings(db_url)
    node = start_node(settings, completion=False)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    datasets = [make_ct(study, series, instance_number=i) for i in range(1, 6)]
    statuses = store(node.port, datasets)
    assert [s.Status for s in statuses] == [0] * 5
    _assert_stored_exactly(node, tmp_path / "storage", 5)
    rows = _instances(node)
    assert {r.sop_instance_uid for r in rows} == {d.SOPInstanceUID for d in datasets}
    assert {r.calling_ae for r in rows} == {"TESTSCU"}
    assert {r.called_ae for r in rows} == {"UNIMEDVL"}
    assert {r.remote_ip for r in rows} == {"127.0.0.1"}
    assert {r.transfer_syntax_uid for r in rows} == {ExplicitVRLittleEndian}
    with Session(node.engine) as s:
        st = s.exec(select(Study)).one()
        assert (st.study_instance_uid, st.instance_count, st.accession_number) == (study, 5, "ACC1")
        se = s.exec(select(Series)).one()
        assert (se.modality, se.body_part_examined, se.series_number, se.instance_count) == ("CT", "CHEST", 1, 5)
    # The stored file holds exactly the dataset that was sent, pixels included.
    back = pydicom.dcmread(tmp_path / "storage" / rows[0].relpath)
    sent = next(d for d in datasets if d.SOPInstanceUID == back.SOPInstanceUID)
    assert back.PixelData == sent.PixelData and back.PatientID == "PAT-1"


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (everything after the file meta)."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    fm = DicomBytesIO()
    write_file_meta_info(fm, ds.file_meta, enforce_standard=False)
    with open(path, "rb") as f:
        pydicom.filereader.read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        offset = f.tell()
    return raw[offset:]


@pytest.mark.dcmtk
def test_storescu_compressed_stored_byte_identical(
    db_url: str, make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    storescu = require_tool("storescu")
    settings = make_settings(db_url)
    node = start_node(settings, completion=False)
    # Each file with the option that makes storescu propose its own (compressed) transfer syntax.
    sends = [("JPEG2000.dcm", "-xw"), ("SC_rgb_jpeg_dcmtk.dcm", "-xy"), ("CT_small.dcm", "-xe")]
    files = [Path(get_testdata_file(name)) for name, _ in sends]
    for f, (_, option) in zip(files, sends, strict=True):
        out = subprocess.run(
            [storescu, option, "-R", "-aec", "UNIMEDVL", "127.0.0.1", str(node.port), str(f)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "Failed" not in out.stderr, out.stderr
    rows = {r.sop_instance_uid: r for r in _instances(node)}
    assert len(rows) == 3
    for f in files:
        src = pydicom.dcmread(f, stop_before_pixels=True)
        row = rows[src.SOPInstanceUID]
        assert row.transfer_syntax_uid == src.file_meta.TransferSyntaxUID
        assert row.calling_ae == "STORESCU"
        stored = tmp_path / "storage" / row.relpath
        # storescu re-encodes the header (sequence lengths...) but not the compressed pixel data.
        assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(f).PixelData, f.name
    assert {r.transfer_syntax_uid for r in rows.values()} >= {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.50"}


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm"])
def test_compressed_bytes_stored_as_sent(name: str, make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    """pynetdicom's chunked sender puts the file's data set on the wire untouched: we store it unchanged."""
    settings = make_settings(f"sqlite:///{tmp_path / 'i.db'}")
    node = start_node(settings, completion=False)
    src = Path(get_testdata_file(name))
    ts = pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        cx = build_context(pydicom.dcmread(src, stop_before_pixels=True).SOPClassUID, ts)
        status = store(node.port, [src], contexts=[cx])[0]  # type: ignore[list-item]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert status.Status == 0
    (row,) = _instances(node)
    assert row.transfer_syntax_uid == ts
    assert _dataset_bytes(tmp_path / "storage" / row.relpath) == _dataset_bytes(src)


def _send_raw(port: int, dataset_bytes: bytes, sop_class: str, sop_instance: str, tmp_path: Path) -> Any:
    """Send arbitrary data set bytes (not produced by pydicom) with pynetdicom's chunked sender."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta)
    path = tmp_path / f"raw-{len(list(tmp_path.glob('raw-*')))}.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + buf.getvalue() + dataset_bytes)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return store(port, [path], contexts=[build_context(sop_class, ExplicitVRLittleEndian)])[0]  # type: ignore[list-item]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def test_bad_datasets_refused_with_comment_and_node_keeps_serving(
    db_url: str, make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    settings = make_settings(db_url)
    node = start_node(settings, completion=False)
    cases: list[tuple[str, Any, range | tuple[int, ...]]] = []

    no_study = make_ct()
    del no_study.StudyInstanceUID
    cases.append(("missing StudyInstanceUID", no_study, (0xC001,)))
    no_series = make_ct()
    del no_series.SeriesInstanceUID
    cases.append(("missing SeriesInstanceUID", no_series, (0xC001,)))
    bad_uid = make_ct(study_uid="1.2.3.abc")
    cases.append(("malformed StudyInstanceUID", bad_uid, (0xC002,)))
    long_uid = make_ct(series_uid="1." + "2" * 70)
    cases.append(("UID over 64 characters", long_uid, (0xC002,)))
    statuses = store(node.port, [c[1] for c in cases])
    for (what, _, expected), status in zip(cases, statuses, strict=True):
        assert status.Status in expected, what
        assert status.ErrorComment, what

    # Missing SOP Instance UID in the data set, and bytes that are not a data set at all.
    sop = "1.2.826.0.1.3680043.8.498.1"
    no_sop = make_ct(sop_uid=sop)
    del no_sop.SOPInstanceUID
    enc = DicomBytesIO()
    enc.is_little_endian, enc.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(enc, no_sop)
    st = _send_raw(node.port, enc.getvalue(), CTImageStorage, sop, tmp_path)
    assert st.Status == 0xC001 and "SOPInstanceUID" in st.ErrorComment
    st = _send_raw(node.port, b"\x08\x00\x16\x00UI\xff\x7f" + b"garbage" * 10, CTImageStorage, sop, tmp_path)
    assert 0xC000 <= st.Status <= 0xCFFF and st.ErrorComment
    # Data set that does not match the SOP class it was sent as.
    mismatch = make_ct()
    enc = DicomBytesIO()
    enc.is_little_endian, enc.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(enc, mismatch)
    st = _send_raw(node.port, enc.getvalue(), MRImageStorage, mismatch.SOPInstanceUID, tmp_path)
    assert st.Status == 0xA900 and st.ErrorComment

    # Nothing indexed, nothing stored, every refusal logged with its reason.
    assert _instances(node) == []
    assert storage_files(tmp_path / "storage") == []
    reasons = [r.reason for r in _rejections(node)]
    assert reasons.count("missing_uid") == 3 and reasons.count("malformed_uid") >= 2
    assert "sop_class_mismatch" in reasons
    assert all(r.stage == "store" and r.status is not None for r in _rejections(node))
    # The node still serves.
    assert [s.Status for s in store(node.port, [make_ct()])] == [0]
    assert len(_instances(node)) == 1


def test_size_cap_and_low_disk_are_out_of_resources(
    db_url: str, make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    settings = make_settings(db_url, node={"max_instance_bytes": 4096})
    node = start_node(settings, completion=False)
    small, big = make_ct(size=8), make_ct(size=64)  # 128 B vs 8 kB of pixels
    statuses = store(node.port, [big, small])
    assert statuses[0].Status == 0xA700 and "max_instance_bytes" in statuses[0].ErrorComment
    assert statuses[1].Status == 0
    node.stop(1)

    settings = make_settings(db_url, storage={"min_free_bytes": 2**62})
    node = start_node(settings, completion=False)
    st = store(node.port, [make_ct()])[0]
    assert st.Status == 0xA700 and "min_free_bytes" in st.ErrorComment
    _assert_stored_exactly(node, tmp_path / "storage", 1)  # only the small one from before
    reasons = [r.reason for r in _rejections(node)]
    assert reasons == ["too_large", "disk_full"]


def test_hostile_values_never_reach_a_path(db_url: str, make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    settings = make_settings(db_url)
    node = start_node(settings, completion=False)
    hostile = [
        make_ct(patient_id="../../../../etc/passwd"),
        make_ct(patient_id="a/b\x00c/../d"),
        make_ct(patient_id="X" * 10_000),
    ]
    hostile[0].SeriesDescription = "../../x"
    hostile[1].AccessionNumber = "/abs/\x00path"
    hostile[2].StudyDescription = "Y" * 10_000
    traversal_uid = make_ct(sop_uid="../../../tmp/evil")
    nul_uid = make_ct(study_uid="1.2.3\x00/../4")
    statuses = store(node.port, [*hostile, traversal_uid, nul_uid])
    assert [s.Status for s in statuses[:3]] == [0, 0, 0]
    assert all(0xC000 <= s.Status <= 0xCFFF for s in statuses[3:])
    root = tmp_path / "storage"
    import re

    # pynetdicom leaves the file of a request it discards (an invalid command UID) in tmp/ under its
    # own random name; the listener's sweeper removes such leftovers.
    for p in storage_files(root / "tmp"):
        assert re.fullmatch(r"tmp[a-z0-9_]+\.dcm", p.name), p.name
    node.listener.sweep_temp(0)
    for p in storage_files(root):
        rel = p.relative_to(root).as_posix()
        assert re.fullmatch(OBJECT_NAME, rel), rel
    assert not any(Path("/tmp/evil").parent.glob("evil*"))
    _assert_stored_exactly(node, root, 3)
    with Session(node.engine) as s:
        ids = sorted(p.patient_id for p in s.exec(select(Patient)).all())
    assert ids == sorted(["../../../../etc/passwd", "a/b\ufffdc/../d", "X" * 10_000])


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_duplicates(db_url: str, policy: str, make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    settings = make_settings(db_url, node={"duplicate_policy": policy})
    node = start_node(settings, completion=False)
    first = make_ct(fill=1)
    assert store(node.port, [first])[0].Status == 0
    original = _instances(node)[0]
    # Same bytes again: success, counted, not stored twice.
    assert [s.Status for s in store(node.port, [first, first])] == [0, 0]
    again = _instances(node)
    assert len(again) == 1 and again[0].duplicate_count == 2 and again[0].sha256 == original.sha256
    assert len([p for p in storage_files(tmp_path / "storage")]) == 1
    # Different bytes under the same SOP Instance UID.
    changed = make_ct(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID, fill=7)
    assert store(node.port, [changed])[0].Status == 0
    rows = _instances(node)
    assert len(rows) == 1 and rows[0].duplicate_count == 3
    with Session(node.engine) as s:
        events = list(s.exec(select(DuplicateEvent)).all())
    assert len(events) == 1
    ev = events[0]
    assert ev.policy == policy and ev.previous_sha256 == original.sha256 and ev.received_sha256 != original.sha256
    root = tmp_path / "storage"
    # Nothing sent to us is lost: both versions are on disk, one is the instance.
    assert len(storage_files(root)) == 2
    assert (root / ev.previous_relpath).is_file() and (root / ev.received_relpath).is_file()
    kept = pydicom.dcmread(root / rows[0].relpath)
    if policy == "keep_first":
        assert ev.action == "kept_first" and rows[0].sha256 == original.sha256
        assert kept.PixelData == first.PixelData
    else:
        assert ev.action == "replaced" and rows[0].sha256 == ev.received_sha256
        assert kept.PixelData == changed.PixelData
    assert hashlib.sha256((root / rows[0].relpath).read_bytes()).hexdigest() == rows[0].sha256


def test_concurrent_associations(db_url: str, make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    """Several associations at once into one study: every instance indexed once, one study row."""
    from concurrent.futures import ThreadPoolExecutor

    settings = make_settings(db_url)
    node = start_node(settings, completion=False)
    study = pydicom.uid.generate_uid()
    batches = [[make_ct(study, instance_number=10 * b + i) for i in range(5)] for b in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: store(node.port, b), batches))
    assert all(s.Status == 0 for r in results for s in r)
    _assert_stored_exactly(node, tmp_path / "storage", 20)
    with Session(node.engine) as s:
        assert s.exec(select(Study)).one().instance_count == 20
        assert len(s.exec(select(Series)).all()) == 20  # make_ct gives each dataset its own series


def test_unknown_sop_class_context_refused(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'i.db'}")
    node = start_node(settings, completion=False)
    from tests.node.conftest import associate

    assoc = associate(
        node.port,
        contexts=[build_context("1.2.3.4.5.6.7.8.9"), build_context(CTImageStorage, ExplicitVRLittleEndian)],
    )
    assert assoc.is_established
    try:
        rejected = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == "1.2.3.4.5.6.7.8.9"]
        assert rejected and rejected[0].result == 0x03  # abstract syntax not supported
        assert assoc.send_c_store(make_ct()).Status == 0
    finally:
        assoc.release()


def test_stored_file_is_readable_part10(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'i.db'}")
    node = start_node(settings, completion=False)
    ds = make_ct()
    store(node.port, [ds])
    row = _instances(node)[0]
    back = pydicom.dcmread(BytesIO((tmp_path / "storage" / row.relpath).read_bytes()))
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.preamble == b"\x00" * 128


def test_index_failure_is_processing_failure_and_keeps_no_file(
    make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    """If the index cannot commit, the peer gets a failure (so it retries) and no orphan file stays."""
    settings = make_settings(f"sqlite:///{tmp_path / 'i.db'}")
    node = start_node(settings, completion=False)
    assert store(node.port, [make_ct()])[0].Status == 0
    import sqlite3

    con = sqlite3.connect(tmp_path / "i.db")
    con.execute("DROP TRIGGER IF EXISTS t_block")
    con.execute("CREATE TRIGGER t_block BEFORE INSERT ON instance BEGIN SELECT RAISE(ABORT, 'index offline'); END")
    con.commit()
    try:
        st = store(node.port, [make_ct()])[0]
    finally:
        con.execute("DROP TRIGGER t_block")
        con.commit()
        con.close()
    assert st.Status == 0x0110 and "not stored" in st.ErrorComment
    _assert_stored_exactly(node, tmp_path / "storage", 1)
    assert [r.reason for r in _rejections(node)] == ["processing_failure"]
    assert store(node.port, [make_ct()])[0].Status == 0  # and it recovers


def test_max_pdu_is_advertised(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'i.db'}", node={"max_pdu": 65536})
    node = start_node(settings, completion=False)
    from tests.node.conftest import associate

    assoc = associate(node.port)
    try:
        assert assoc.acceptor.maximum_length == 65536
        assert assoc.send_c_store(make_ct(size=256)).Status == 0  # 128 kB data set split into PDUs
    finally:
        assoc.release()
