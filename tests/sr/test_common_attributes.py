"""What every object shares: AI provenance, source identity, UIDs under the configured root,
UTF-8 text that survives a round trip, a zeroed preamble."""

from __future__ import annotations

import pydicom
import pytest

from sr_writers import Provenance
from sr_writers.uids import check_uid_root, new_uid

from .sources import REPORT_TEXT, build_sources, write_all_objects

ROOT = "1.3.6.1.4.1.55555.7."


def _uids(ds, out=None):
    out = set() if out is None else out
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _uids(item, out)
        elif elem.VR == "UI" and elem.value:
            out.update(str(v) for v in (elem.value if elem.VM > 1 else [elem.value]))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    prov = Provenance(model_version="1.0.0", checkpoint_hash="c0ffee" + "1" * 58, uid_root=ROOT)
    sources = build_sources("random")
    paths = write_all_objects(sources, prov, tmp_path_factory.mktemp("objs"))
    return prov, sources, paths


def test_ai_provenance_everywhere(written):
    prov, _, paths = written
    for name, path in paths.items():
        ds = pydicom.dcmread(path)
        assert ds.Manufacturer == "UniMedVL project", name
        assert ds.ManufacturerModelName == "UniMedVL", name
        versions = list(ds.SoftwareVersions) if ds["SoftwareVersions"].VM > 1 else [ds.SoftwareVersions]
        assert "UniMedVL 1.0.0" in versions and any("c0ffee" in v for v in versions), name
        assert ds.DeviceSerialNumber == prov.checkpoint_hash[:16], name
        assert ds.SeriesDescription.startswith("AI "), name
        equipment = ds.ContributingEquipmentSequence
        ai = [e for e in equipment if e.Manufacturer == "UniMedVL project"]
        assert len(ai) == 1, name
        assert ai[0].PurposeOfReferenceCodeSequence[0].CodeValue in ("109100", "109102"), name


def test_identity_copied_so_objects_land_in_the_source_study(written):
    _, sources, paths = written
    src = sources[0]
    for name, path in paths.items():
        ds = pydicom.dcmread(path)
        for kw in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "AccessionNumber",
            "StudyDescription",
        ):
            assert ds.get(kw) == src.get(kw), f"{name}: {kw}"
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID, name


def test_new_uids_are_under_the_configured_root(written):
    _, sources, paths = written
    source_uids = set().union(*(_uids(s) for s in sources))
    for name, path in paths.items():
        ds = pydicom.dcmread(path)
        for uid in _uids(ds) - source_uids:
            assert uid.startswith((ROOT, "1.2.840.10008.")), f"{name}: {uid} is not under {ROOT}"
            assert len(uid) <= 64
        assert ds.SOPInstanceUID.startswith(ROOT) and ds.SeriesInstanceUID.startswith(ROOT)


def test_utf8_text_survives_round_trip(written):
    _, _, paths = written
    for name, path in paths.items():
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192", name
        assert str(ds.PatientName) == "Müller^Jürgen", name
    sr = pydicom.dcmread(paths["report_sr"])
    texts = [i.TextValue for sec in sr.ContentSequence for i in sec.get("ContentSequence", []) if "TextValue" in i]
    assert REPORT_TEXT in texts
    seg = pydicom.dcmread(paths["seg_binary"])
    assert seg.SegmentSequence[0].SegmentLabel == "Läsion ü"


def test_latin1_source_is_reencoded_as_utf8(provenance, tmp_path):
    """A source in ISO 8859-1: names are decoded on read and written back as UTF-8."""
    sources = build_sources("ascending")
    for s in sources:
        s.SpecificCharacterSet = "ISO_IR 100"
    latin = []
    for s in sources:
        s.PatientName = "Gärtner^Zoë"
        path = tmp_path / f"{s.SOPInstanceUID[-8:]}.dcm"
        s.save_as(path, enforce_file_format=True)
        latin.append(pydicom.dcmread(path))
    assert b"G\xe4rtner" in (tmp_path / f"{sources[0].SOPInstanceUID[-8:]}.dcm").read_bytes()
    (tmp_path / "out").mkdir()
    paths = write_all_objects(latin, provenance, tmp_path / "out")
    for path in paths.values():
        raw = path.read_bytes()
        assert "Gärtner^Zoë".encode() in raw
        assert str(pydicom.dcmread(path).PatientName) == "Gärtner^Zoë"


def test_zeroed_preamble_and_part10_header(written):
    _, _, paths = written
    for name, path in paths.items():
        raw = path.read_bytes()
        assert raw[:128] == b"\x00" * 128, name
        assert raw[128:132] == b"DICM", name
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1", name


def test_demo_weights_are_labelled(tmp_path):
    prov = Provenance(is_demo=True, checkpoint_hash="tinyweights")
    paths = write_all_objects(build_sources("ascending"), prov, tmp_path)
    for name, path in paths.items():
        ds = pydicom.dcmread(path)
        assert ds.SeriesDescription.startswith("AI DEMO "), name
        assert "demo" in ds.ManufacturerModelName, name


def test_uid_root_validation():
    assert new_uid().startswith("2.25.") and len(new_uid()) <= 64
    assert check_uid_root("1.2.3") == "1.2.3."
    for bad in ("1.02.3.", "abc.", "1..2.", "1." * 30):
        with pytest.raises(ValueError):
            check_uid_root(bad)
    long_root = "1.2.826.0.1.3680043.10.999.123456."
    uid = new_uid(long_root)
    assert uid.startswith(long_root) and len(uid) <= 64
    with pytest.raises(ValueError):
        new_uid("x.y.")
