"""De-identification (PS3.15 Annex E Basic Profile + options) on real files, every option combination."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from dicom_node.batch.deidentify import Deidentifier, DeidOptions, burned_in_reason
from tests.batch.conftest import EXTRA, IDENTITIES, identifying_values, make_archive

FLAGS = ("retain_longitudinal", "retain_patient_characteristics", "clean_descriptors", "retain_uids")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("deid")
    studies = make_archive(root, n_cr=2, ct_slices=2, us=False)
    return [p for ps in studies.values() for p in ps]


def _text(ds: Dataset) -> str:
    out: list[str] = []
    ds.walk(lambda _d, e: out.append(str(e.value)) if e.VR not in ("OB", "OW", "SQ", "UN") else None)
    out += [str(e.value) for e in ds.file_meta]
    return "\n".join(out)


@pytest.mark.parametrize("combo", list(itertools.product([False, True], repeat=len(FLAGS))))
def test_every_option_combination(files: list[Path], combo: tuple[bool, ...]) -> None:
    opts = DeidOptions(enabled=True, **dict(zip(FLAGS, combo, strict=True)))
    d = Deidentifier("secret-1", opts)
    identifying = identifying_values(files)
    uids = {v for v in identifying if v[:1].isdigit() and "." in v}
    for p in files:
        src = dcmread(p)
        ds = d.apply(dcmread(p))
        text = _text(ds)
        # Patient identity, IDs, names, institution, address: gone whatever the options.
        for v in identifying - uids - {EXTRA["StudyDate"]}:
            assert v not in text, (opts, v)
        assert not any(e.tag.is_private for e in ds)
        assert ds.PatientIdentityRemoved == "YES"
        codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert codes[0] == "113100"
        # UIDs: replaced unless retained.
        if opts.retain_uids:
            assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.SOPInstanceUID == src.SOPInstanceUID
            assert "113110" in codes
        else:
            assert not (uids & set(text.split("\n"))), opts
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == src.SOPClassUID
        # Dates: shifted (longitudinal) or emptied.
        if opts.retain_longitudinal:
            assert ds.StudyDate and ds.StudyDate != src.StudyDate
        else:
            assert ds.StudyDate == ""
        assert ds.PatientBirthDate == ""
        # Patient characteristics.
        if opts.retain_patient_characteristics:
            assert (ds.PatientSex, ds.PatientAge) == ("F", "063Y")
        else:
            assert ds.PatientSex == "" and "PatientAge" not in ds
        # Descriptors: kept without the patient's name, or removed.
        if opts.clean_descriptors:
            assert ds.StudyDescription.startswith("CHEST") and "DOE" not in ds.StudyDescription.upper()
        else:
            assert "StudyDescription" not in ds


def test_pseudonyms_consistent_across_instances_and_processes(files: list[Path]) -> None:
    a = Deidentifier("s", DeidOptions(enabled=True))
    b = Deidentifier("s", DeidOptions(enabled=True))  # another worker, same batch secret
    other = Deidentifier("t", DeidOptions(enabled=True))
    by_patient: dict[str, set[str]] = {}
    for p in files:
        src = dcmread(p)
        x, y, z = a.apply(dcmread(p)), b.apply(dcmread(p)), other.apply(dcmread(p))
        assert (x.PatientID, x.StudyInstanceUID, x.SeriesInstanceUID) == (
            y.PatientID,
            y.StudyInstanceUID,
            y.SeriesInstanceUID,
        )
        assert x.PatientID != z.PatientID and x.StudyInstanceUID != z.StudyInstanceUID
        by_patient.setdefault(str(src.PatientID), set()).add(str(x.PatientID))
        assert a.pseudonyms(str(src.PatientID), str(src.StudyInstanceUID)) == {
            "patient_id": str(x.PatientID),
            "study_instance_uid": str(x.StudyInstanceUID),
        }
    assert set(by_patient) == {IDENTITIES[0]["PatientID"], IDENTITIES[1]["PatientID"]}
    assert all(len(v) == 1 for v in by_patient.values())  # one pseudonym per patient


@pytest.mark.parametrize(
    ("modality", "flag", "refused"),
    [
        ("CT", None, False),
        ("CT", "YES", True),
        ("CR", "NO", False),
        ("US", None, True),
        ("US", "NO", False),
        ("US", "YES", True),
        ("SC", None, True),
        ("SC", "NO", False),
        ("XC", None, True),
        ("OT", None, True),
        ("MR", "yes", True),
    ],
)
def test_burned_in_annotation_sweep(modality: str, flag: str | None, refused: bool) -> None:
    ds = Dataset()
    ds.Modality = modality
    if flag is not None:
        ds.BurnedInAnnotation = flag
    reason = burned_in_reason(ds)
    assert (reason is not None) == refused
    if refused:
        assert "burned-in" in reason.lower() or "BurnedInAnnotation" in reason
