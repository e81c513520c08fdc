"""The writer half of ../shared/cases/real-world/ (cases.json): each folder through the writers
it concerns, checked with dciodvfy/dsrdump; plus the pixel-format kinds around us_8bit (8-bit,
RGB, YBR sources) and the refusals that name their reason."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest

from sr_writers import (
    DerivedImages,
    NoFrameOfReferenceError,
    ReportResult,
    SourceError,
    UnsupportedSourceError,
    to_bytes,
    write,
    write_derived_series,
    write_report_sr,
    write_seg,
)

from .sources import REPORT, build_sources, distinct_masks, real_world_case
from .test_charsets import all_outputs
from .validators import dciodvfy, unexpected_dciodvfy, unexpected_dsrdump

VQA = ReportResult(qa=[("Is there a fracture?", "No.")], title="VQA")


def _reread(ds) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def _new_errors(path, source_path) -> list[str]:
    """dciodvfy findings of ``path`` that are neither allow-listed nor already in its source."""
    source = {f"{k} - {m}" for k, m in dciodvfy(source_path)[1]}
    return [p for p in unexpected_dciodvfy(path) if p not in source]


@pytest.mark.parametrize(
    "case, name",
    [
        ("cr_charset_misspelled_utf8", "Müller^Jörg"),
        ("cr_charset_iso2022_japanese", "Yamada^Taro=山田^太郎=やまだ^たろう"),
    ],
)
def test_charset_cases_give_utf8_report_and_vqa(case, name, provenance, tmp_path):
    sources = real_world_case(case)
    assert str(sources[0].PatientName) == name  # what pydicom decodes from the source's declaration
    for kind, result in (("report", REPORT), ("vqa", VQA)):
        path = write(write_report_sr(result, sources, provenance), tmp_path / f"{kind}.dcm")
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == name
        assert name.encode("utf-8") in path.read_bytes()
        assert not unexpected_dciodvfy(path), kind
        assert not unexpected_dsrdump(path), kind


def test_charset_case_segment_is_refused_for_want_of_a_frame_of_reference(provenance):
    sources = real_world_case("cr_charset_misspelled_utf8")
    with pytest.raises(NoFrameOfReferenceError, match="has no Frame of Reference UID"):
        write_seg(distinct_masks(sources), sources, provenance)


def test_no_patient_id_gives_every_output_with_an_empty_patient_id(provenance, tmp_path):
    sources = real_world_case("ct_no_patient_id")
    assert "PatientID" not in sources[0]
    for kind, ds in all_outputs(sources, provenance).items():
        path = write(ds, tmp_path / f"{kind}.dcm")
        back = pydicom.dcmread(path)
        assert "PatientID" in back and back.PatientID == "", kind
        assert str(back.PatientName) == str(sources[0].PatientName)
        assert not unexpected_dciodvfy(path), kind


def _us_8bit():
    return real_world_case("us_8bit")


def test_8bit_source_gives_8bit_derived_images_clipped_to_range(provenance, tmp_path):
    sources = _us_8bit()
    src = sources[0]
    src_path = write(copy.deepcopy(src), tmp_path / "source.dcm")
    values = src.pixel_array.astype(float) * 1.5 - 40  # runs below 0 and above 255
    for label, pixels in (("translate", values), ("super_resolve", np.kron(values, np.ones((2, 2))))):
        [d] = write_derived_series(DerivedImages({str(src.SOPInstanceUID): pixels}, label), sources, provenance)
        back = _reread(d)
        fmt = ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PhotometricInterpretation")
        assert [back[k].value for k in fmt] == [src[k].value for k in fmt], label
        assert back.pixel_array.dtype == np.uint8
        assert np.array_equal(back.pixel_array, np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), label
        assert not _new_errors(write(d, tmp_path / f"{label}.dcm"), src_path), label


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_source_gives_rgb_derived_images(photometric, provenance, tmp_path):
    src = _us_8bit()[0]
    grey = src.pixel_array
    src.SamplesPerPixel, src.PhotometricInterpretation, src.PlanarConfiguration = 3, photometric, 0
    src.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()  # grey in either space (Cb=Cr=128 aside)
    src_path = write(copy.deepcopy(src), tmp_path / "source.dcm")
    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 300, dtype=np.int32)], axis=-1)
    [d] = write_derived_series(DerivedImages({str(src.SOPInstanceUID): rgb}, "translate"), [src], provenance)
    back = _reread(d)
    assert (back.PhotometricInterpretation, back.SamplesPerPixel, back.PlanarConfiguration) == ("RGB", 3, 0)
    assert (back.BitsAllocated, back.BitsStored, back.HighBit, back.PixelRepresentation) == (8, 8, 7, 0)
    assert np.array_equal(back.pixel_array, np.clip(rgb, 0, 255).astype(np.uint8))
    assert "WindowCenter" not in back
    assert not _new_errors(write(d, tmp_path / "derived.dcm"), src_path)


def test_retired_sop_class_is_accepted_and_written_in_its_successor(provenance, tmp_path):
    sources = real_world_case("us_retired_sop_class")
    src = sources[0]
    assert src.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
    sr = _reread(write_report_sr(REPORT, sources, provenance))
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPClassUID == src.SOPClassUID  # references name the true class
    pixels = {str(src.SOPInstanceUID): src.pixel_array.astype(float)}
    [d] = write_derived_series(DerivedImages(pixels, "translate"), sources, provenance)
    assert d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"
    assert d.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
    path = write(d, tmp_path / "derived.dcm")
    assert dciodvfy(path)[0] != "" and not unexpected_dciodvfy(path)  # the current IOD, no findings


def _cine(photometric: str = "MONOCHROME2", frames: int = 3) -> pydicom.Dataset:
    """The us_8bit image as a multi-frame US cine (Ultrasound Multi-frame Image Storage)."""
    src = _us_8bit()[0]
    grey = src.pixel_array
    stack = np.stack([np.roll(grey, 5 * f, axis=1) for f in range(frames)])
    if photometric != "MONOCHROME2":
        stack = np.repeat(stack[..., None], 3, axis=-1)
        src.SamplesPerPixel, src.PhotometricInterpretation, src.PlanarConfiguration = 3, photometric, 0
    src.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    src.file_meta.MediaStorageSOPClassUID = src.SOPClassUID
    src.NumberOfFrames, src.FrameTime = frames, 33.3
    src.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    src.PixelData = stack.tobytes()
    return src


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "RGB"])
def test_us_cine_gives_a_multi_frame_derived_image(photometric, provenance, tmp_path):
    src = _cine(photometric)
    src_path = write(copy.deepcopy(src), tmp_path / "source.dcm")
    values = src.pixel_array.astype(float) + 10
    [d] = write_derived_series(DerivedImages({str(src.SOPInstanceUID): values}, "translate"), [src], provenance)
    back = _reread(d)
    assert (back.SOPClassUID, back.NumberOfFrames, back.BitsAllocated) == (src.SOPClassUID, 3, 8)
    assert back.PhotometricInterpretation == photometric
    assert np.array_equal(back.pixel_array, np.clip(np.rint(values), 0, 255).astype(np.uint8))
    assert not _new_errors(write(d, tmp_path / "derived.dcm"), src_path)


@pytest.mark.parametrize("case", ["enhanced_ct_real", "legacy_enhanced_ct"])
def test_enhanced_sources_give_enhanced_derived_images_with_per_frame_geometry(case, provenance, tmp_path):
    from pydicom.pixels import apply_modality_lut

    sources = build_sources(case)
    src = sources[0]
    src_path = write(copy.deepcopy(src), tmp_path / "source.dcm")
    frames = int(src.NumberOfFrames)
    modality = np.stack([apply_modality_lut(f, src) for f in src.pixel_array.reshape(frames, src.Rows, src.Columns)])
    for label, pixels in (("translate", 500 - modality), ("super_resolve", np.kron(modality, np.ones((1, 2, 2))))):
        by_frame = {(str(src.SOPInstanceUID), n + 1): pixels[n] for n in range(frames)}
        [d] = write_derived_series(DerivedImages(by_frame, label), sources, provenance)
        back = _reread(d)
        assert (back.SOPClassUID, back.NumberOfFrames) == (src.SOPClassUID, frames)
        assert back.ImageType[0] == "DERIVED"
        assert np.array_equal(back.pixel_array.reshape(pixels.shape), np.rint(pixels)), label
        scale = pixels.shape[1] / int(src.Rows)
        for n, (old, new) in enumerate(
            zip(src.PerFrameFunctionalGroupsSequence, back.PerFrameFunctionalGroupsSequence, strict=True)
        ):
            ref = new.DerivationImageSequence[0].SourceImageSequence[0]
            assert (ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber)) == (src.SOPInstanceUID, n + 1)
            old_ipp = np.array([float(v) for v in old.PlanePositionSequence[0].ImagePositionPatient])
            new_ipp = np.array([float(v) for v in new.PlanePositionSequence[0].ImagePositionPatient])
            assert np.allclose(old_ipp, new_ipp, atol=1.0 if scale != 1 else 1e-6)  # moved half a pixel at most
        spacing = back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        old_spacing = src.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [float(v) for v in spacing] == pytest.approx([float(v) / scale for v in old_spacing])
        assert not _new_errors(write(d, tmp_path / f"{label}.dcm"), src_path), label


def test_multi_frame_sources_without_frame_geometry_are_refused_with_the_reason(provenance):
    ct = build_sources("ct_small_real")
    ct[0].NumberOfFrames = 2  # frames but no per-frame functional groups to place them
    with pytest.raises(UnsupportedSourceError, match="no per-frame functional groups") as err:
        pixels = np.zeros((2, int(ct[0].Rows), int(ct[0].Columns)))
        write_derived_series(DerivedImages({str(ct[0].SOPInstanceUID): pixels}, "x"), ct, provenance)
    assert isinstance(err.value, SourceError) and isinstance(err.value, ValueError)
