"""Derived series in the source SOP class: geometry, references, pixels, and nothing stale."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from sr_writers import DerivedImages, SourceError, to_bytes, write_derived_series

from .sources import build_sources, modality_values


def _read(ds):
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def _derive(sources, provenance, f=lambda v: 1000 - v, **kw):
    pixels = {str(s.SOPInstanceUID): f(modality_values(s)) for s in sources}
    result = DerivedImages(pixels, "modality translation CT->MR")
    return pixels, [_read(d) for d in write_derived_series(result, sources, provenance, **kw)]


def test_same_geometry_new_identity(provenance):
    sources = build_sources("oblique")
    for s in sources:
        s.add_new((0x0009, 0x0010), "LO", "ACME private")
        s.add_new((0x0009, 0x1001), "LO", "secret")
        s.SmallestImagePixelValue = 0
    src_copy = [pydicom.Dataset(s) for s in sources]
    pixels, derived = _derive(sources, provenance)
    assert len(derived) == len(sources)
    series = {d.SeriesInstanceUID for d in derived}
    assert len(series) == 1 and sources[0].SeriesInstanceUID not in series
    for src, d in zip(sources, derived, strict=True):
        assert d.SOPClassUID == src.SOPClassUID
        assert d.SOPInstanceUID != src.SOPInstanceUID
        for kw in (
            "StudyInstanceUID",
            "FrameOfReferenceUID",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
            "InstanceNumber",
            "PatientName",
        ):
            assert d[kw].value == src[kw].value, kw
        assert list(d.ImageType[:2]) == ["DERIVED", "SECONDARY"] and d.ImageType[2] == "AXIAL"
        assert d.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert "modality translation" in d.DerivationDescription
        assert d.DerivationCodeSequence[0].CodeValue == "113085"
        assert d.SyntheticData == "YES"
        assert not any(e.tag.is_private for e in d)
        assert "SmallestImagePixelValue" not in d
        assert d.SeriesDescription.startswith("AI ")
        purposes = [e.PurposeOfReferenceCodeSequence[0].CodeValue for e in d.ContributingEquipmentSequence]
        assert purposes == ["109101", "109100"]  # scanner, then the AI model
        assert d.ContributingEquipmentSequence[0].Manufacturer == "SyntheticCT"
        assert d.Manufacturer == "UniMedVL project"
        hu = apply_modality_lut(d.pixel_array, d)
        assert np.array_equal(hu, np.rint(pixels[str(src.SOPInstanceUID)]))
        assert (d.BitsAllocated, d.RescaleSlope, d.RescaleIntercept) == (16, 1, 0)
        assert d.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    # the caller's source datasets are untouched
    for before, after in zip(src_copy, sources, strict=True):
        assert before.SOPInstanceUID == after.SOPInstanceUID and before.SeriesInstanceUID == after.SeriesInstanceUID
        assert "SourceImageSequence" not in after and "SyntheticData" not in after


def test_window_recomputed_unless_kept(provenance):
    sources = build_sources("ascending")
    _, derived = _derive(sources, provenance)
    assert (float(derived[0].WindowCenter), float(derived[0].WindowWidth)) != (40.0, 400.0)
    _, kept = _derive(sources, provenance, f=lambda v: v, keep_source_window=True)
    assert (float(kept[0].WindowCenter), float(kept[0].WindowWidth)) == (40.0, 400.0)


def test_super_resolution_keeps_field_of_view(provenance):
    sources = build_sources("mr_small_real")
    src = sources[0]
    _, [d] = _derive(sources, provenance, f=lambda v: np.kron(v, np.ones((2, 2))))
    assert (d.Rows, d.Columns) == (2 * src.Rows, 2 * src.Columns)
    assert [float(v) for v in d.PixelSpacing] == pytest.approx([float(v) / 2 for v in src.PixelSpacing])
    # outer edge of the first pixel stays where it was: IPP moves half a new pixel inwards
    iop = np.array([float(v) for v in src.ImageOrientationPatient])
    old_ipp = np.array([float(v) for v in src.ImagePositionPatient])
    sp = float(src.PixelSpacing[0])
    expected = old_ipp - iop[:3] * sp / 4 - iop[3:] * sp / 4
    assert np.allclose([float(v) for v in d.ImagePositionPatient], expected, atol=1e-4)
    assert "RescaleSlope" not in d  # MR Image has no Modality LUT


def test_lossy_source_history_is_kept(provenance):
    sources = build_sources("ascending")
    sources[0].LossyImageCompression = "01"
    sources[0].LossyImageCompressionRatio = 10
    _, derived = _derive(sources, provenance)
    assert derived[0].LossyImageCompression == "01"
    assert "LossyImageCompression" not in derived[1]


def test_bad_input_is_refused(provenance):
    sources = build_sources("ascending")
    with pytest.raises(SourceError, match="not among the sources"):
        write_derived_series(DerivedImages({"1.2.3": np.zeros((32, 32))}, "x"), sources, provenance)
    with pytest.raises(ValueError, match="16 bits"):
        write_derived_series(
            DerivedImages({str(sources[0].SOPInstanceUID): np.full((32, 32), 1e6)}, "x"), sources, provenance
        )
    with pytest.raises(ValueError, match="NaN"):
        write_derived_series(
            DerivedImages({str(sources[0].SOPInstanceUID): np.full((32, 32), np.nan)}, "x"), sources, provenance
        )
    mf = build_sources("legacy_enhanced_ct")
    with pytest.raises(ValueError, match=r"6-frame source must be \(frames, rows, cols"):
        write_derived_series(DerivedImages({str(mf[0].SOPInstanceUID): np.zeros((32, 32))}, "x"), mf, provenance)
