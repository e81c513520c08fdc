"""Sources without (or with empty) non-Type-1 Patient, Study, Series, Equipment and Image
attributes: every writer still writes, the Type 2 identity attributes are present and empty, and
``dciodvfy -new`` finds nothing beyond the allow-list (derived images: nothing their source did
not already have, since they carry the source's own image attributes)."""

from __future__ import annotations

import io

import pydicom
import pytest

from dicom_node.synthetic import ct_series
from sr_writers import write
from sr_writers.source_prep import TYPE2_IDENTITY

from .test_charsets import all_outputs
from .validators import dciodvfy, unexpected_dciodvfy

# Every attribute ct_series writes that is not Type 1 in the CT Image IOD (PS3.3 A.3.3), by module.
NOT_TYPE1 = (
    *TYPE2_IDENTITY,  # Patient (C.7.1.1), General Study (C.7.2.1)
    "StudyDescription",
    "SeriesNumber",  # General Series (C.7.3.1)
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "PatientPosition",
    "PositionReferenceIndicator",  # Frame of Reference (C.7.4.1)
    "Manufacturer",  # General Equipment (C.7.5.1)
    "InstanceNumber",  # General Image (C.7.6.1)
    "ContentDate",
    "ContentTime",
    "AcquisitionNumber",  # CT Image (C.8.2.1)
    "KVP",
    "SliceThickness",  # Image Plane (C.7.6.2)
)


def _sources(drop: str, empty: bool):
    out = []
    for ds in ct_series(2, rows=8, columns=8, seed=21):
        if empty:
            setattr(ds, drop, None)
        else:
            delattr(ds, drop)
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        out.append(pydicom.dcmread(io.BytesIO(buf.getvalue())))
    return out


CASES = [(kw, False) for kw in NOT_TYPE1] + [(kw, True) for kw in TYPE2_IDENTITY]


@pytest.mark.parametrize("drop, empty", CASES, ids=[f"{kw}-{'empty' if e else 'absent'}" for kw, e in CASES])
def test_outputs_without_the_attribute(drop, empty, provenance, tmp_path):
    sources = _sources(drop, empty)
    source_findings = set(dciodvfy(write(sources[0], tmp_path / "source.dcm"))[1])
    for kind, ds in all_outputs(sources, provenance).items():
        path = write(ds, tmp_path / f"{kind}.dcm")
        back = pydicom.dcmread(path)
        for kw in TYPE2_IDENTITY:
            assert kw in back, f"{kind}: Type 2 {kw} is missing"
        if drop in TYPE2_IDENTITY:
            assert back[drop].is_empty, f"{kind}: {drop} should be empty like the source's"
        problems = unexpected_dciodvfy(path)
        if kind == "derived":
            problems = [p for p in problems if tuple(p.split(" - ", 1)) not in source_findings]
        assert not problems, f"{kind} without {drop}: {problems}"


def test_single_image_without_slice_thickness_is_refused_for_seg(provenance):
    from sr_writers import NoPatientGeometryError, write_seg

    from .sources import distinct_masks

    sources = _sources("SliceThickness", empty=False)[:1]
    with pytest.raises(NoPatientGeometryError, match="single image without a SliceThickness"):
        write_seg(distinct_masks(sources), sources, provenance)
