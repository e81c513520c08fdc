"""Synthetic CT/CR objects: standard-conformant (dciodvfy) with real geometry and a visible phantom."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.synthetic import make_cr, make_ct_series
from tests.conftest import require_tool


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    r = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (r.stdout + r.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


def test_ct_series_geometry_and_uids(tmp_path: Path):
    paths = make_ct_series(tmp_path, 6, rows=128, cols=96, seed=3, study_uid="2.25.42")
    assert [p.name for p in paths] == [f"ct_{i:05d}.dcm" for i in range(1, 7)]
    ds = [pydicom.dcmread(p) for p in paths]
    assert {d.StudyInstanceUID for d in ds} == {"2.25.42"}
    assert len({d.SeriesInstanceUID for d in ds}) == 1
    assert len({d.FrameOfReferenceUID for d in ds}) == 1
    assert len({d.SOPInstanceUID for d in ds}) == 6
    assert all(d.SOPInstanceUID.startswith("2.25.") for d in ds)
    assert ds[0].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds[0].file_meta.MediaStorageSOPInstanceUID == ds[0].SOPInstanceUID
    z = [float(d.ImagePositionPatient[2]) for d in ds]
    assert np.allclose(np.diff(z), -float(ds[0].SliceThickness))
    assert [int(d.InstanceNumber) for d in ds] == list(range(1, 7))
    assert (ds[0].Rows, ds[0].Columns) == (128, 96)
    assert ds[0].pixel_array.dtype == np.int16


def test_ct_phantom_has_body_lungs_and_lesion(tmp_path: Path):
    paths = make_ct_series(tmp_path, 9, rows=128, cols=128)
    mid = pydicom.dcmread(paths[4])
    hu = mid.pixel_array * float(mid.RescaleSlope) + float(mid.RescaleIntercept)
    assert hu[2, 2] < -900  # air outside the body
    assert abs(float(np.median(hu[30, 60:68])) - 40) < 30  # anterior soft tissue
    assert float(np.median(hu[60, 40:46])) < -700  # left lung
    assert float(np.median(hu[58:63, 86:91])) > 0  # the lesion sits inside the right lung on the middle slice
    first = pydicom.dcmread(paths[0])
    hu0 = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert float(np.median(hu0[55:65, 84:92])) < -700  # no lesion at the ends of the series


def test_ct_is_deterministic_per_seed(tmp_path: Path):
    a = pydicom.dcmread(make_ct_series(tmp_path / "a", 1, rows=32, cols=32, seed=5)[0]).pixel_array
    b = pydicom.dcmread(make_ct_series(tmp_path / "b", 1, rows=32, cols=32, seed=5)[0]).pixel_array
    assert np.array_equal(a, b)


def test_cr_is_monochrome2_12_bit(tmp_path: Path):
    ds = pydicom.dcmread(make_cr(tmp_path, rows=256, cols=200))
    assert ds.Modality == "CR" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.BitsStored, ds.Rows, ds.Columns) == (12, 256, 200)
    px = ds.pixel_array
    assert px.max() <= 4095
    assert px[128, 100] > px[128, 50]  # mediastinum brighter than lung


@pytest.mark.dcmtk
def test_ct_slice_passes_dciodvfy(tmp_path: Path):
    paths = make_ct_series(tmp_path, 3)
    assert _dciodvfy_errors(paths[1]) == []


@pytest.mark.dcmtk
def test_cr_passes_dciodvfy(tmp_path: Path):
    assert _dciodvfy_errors(make_cr(tmp_path)) == []


def test_zero_slices_is_an_error(tmp_path: Path):
    with pytest.raises(ValueError, match="n_slices"):
        make_ct_series(tmp_path, 0)
