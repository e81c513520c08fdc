"""A mask drawn on source frame k must come back on source frame k, for every source ordering."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest

from sr_writers import SourceError, labelmap_to_binary, read_masks, to_bytes, write_seg
from sr_writers.results import Segment, SegmentationResult

from .sources import SOURCE_CASES, build_sources, distinct_masks, frame_keys


def _roundtrip(ds):
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def _highdicom_pixels(seg_ds, sources):
    """highdicom's own reader: frames by source reference -> {key: (segments, rows, cols)}."""
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    numbers = [int(i.SegmentNumber) for i in seg_ds.SegmentSequence if int(i.SegmentNumber) != 0]
    keys = frame_keys(sources)
    if isinstance(keys[0], tuple):
        arr = seg.get_pixels_by_source_frame(keys[0][0], [k[1] for k in keys], segment_numbers=numbers)
    else:
        arr = seg.get_pixels_by_source_instance(keys, segment_numbers=numbers)
    return {k: np.moveaxis(arr[i] > 0, -1, 0) for i, k in enumerate(keys)}


def _source_positions(sources):
    """{key: (IPP, IOP, spacing)} straight from the source headers."""
    out = {}
    for key in frame_keys(sources):
        if isinstance(key, tuple):
            ds = sources[0]
            per = ds.PerFrameFunctionalGroupsSequence[key[1] - 1]
            shared = ds.SharedFunctionalGroupsSequence[0]

            def grp(kw, per=per, shared=shared):
                return (per if kw in per else shared)[kw][0]

            ipp = grp("PlanePositionSequence").ImagePositionPatient
        else:
            ds = next(s for s in sources if s.SOPInstanceUID == key)
            ipp = ds.ImagePositionPatient
        out[key] = np.array([float(v) for v in ipp])
    return out


def _by_position(seg_ds, sources):
    """Geometry only, ignoring every UID reference: place each SEG frame by its own
    ImagePositionPatient on the source frame at that position (what a viewer falls back to)."""
    positions = _source_positions(sources)
    rows, cols = int(seg_ds.Rows), int(seg_ds.Columns)
    pixels = seg_ds.pixel_array.reshape(-1, rows, cols)
    shared = seg_ds.SharedFunctionalGroupsSequence[0]
    labelmap = seg_ds.SegmentationType == "LABELMAP"
    n_segments = len([i for i in seg_ds.SegmentSequence if int(i.SegmentNumber) != 0])
    out = {k: np.zeros((n_segments, rows, cols), dtype=bool) for k in positions}
    for i, item in enumerate(seg_ds.PerFrameFunctionalGroupsSequence):
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        matches = [k for k, p in positions.items() if np.allclose(p, ipp, atol=1e-3)]
        assert len(matches) == 1, f"SEG frame {i + 1} at {ipp} matches {len(matches)} source frames"
        if labelmap:
            for s in range(n_segments):
                out[matches[0]][s] |= pixels[i] == s + 1
        else:
            ident = item if "SegmentIdentificationSequence" in item else shared
            s = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            out[matches[0]][s - 1] |= pixels[i].astype(bool)
    return out


def _expected(result: SegmentationResult, sources):
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    return {k: result.mask_for(k, rows, cols) for k in frame_keys(sources)}


def _assert_same(got, expected, how):
    assert set(got) == set(expected)
    for key, mask in expected.items():
        assert np.array_equal(got[key], mask), f"{how}: mask differs on source frame {key}"


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_mask_on_frame_k_comes_back_on_frame_k(case, seg_type, provenance):
    sources = build_sources(case)
    result = distinct_masks(sources)
    seg_ds = _roundtrip(write_seg(result, sources, provenance, segmentation_type=seg_type))
    expected = _expected(result, sources)
    _assert_same(_highdicom_pixels(seg_ds, sources), expected, "highdicom by source reference")
    _assert_same(_by_position(seg_ds, sources), expected, "by frame position")
    _assert_same(read_masks(seg_ds, sources).masks, expected, "sr_writers.read_masks")
    # One frame per source frame and segment (BINARY) or per source frame (LABELMAP): nothing omitted.
    per_frame = len(result.segments) if seg_type == "BINARY" else 1
    assert int(seg_ds.NumberOfFrames) == len(expected) * per_frame
    assert seg_ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID


def test_frames_are_in_spatial_order_for_random_input(provenance):
    sources = build_sources("oblique")
    seg_ds = _roundtrip(write_seg(distinct_masks(sources, two_segments=False), sources, provenance))
    iop = np.array([float(v) for v in sources[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    z = [
        float(np.dot([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient], normal))
        for f in seg_ds.PerFrameFunctionalGroupsSequence
    ]
    assert z == sorted(z) or z == sorted(z, reverse=True)


def test_omit_empty_frames_option_still_places_frames(provenance):
    sources = build_sources("gaps")
    result = distinct_masks(sources)
    seg_ds = _roundtrip(write_seg(result, sources, provenance, omit_empty_frames=True))
    nonempty = sum(int(m.any()) for mask in result.masks.values() for m in mask)
    assert int(seg_ds.NumberOfFrames) == nonempty
    _assert_same(_highdicom_pixels(seg_ds, sources), _expected(result, sources), "omitted empty frames")


def test_highdicom_volume_places_mask_in_patient_space(provenance):
    """Read back as a Volume: every labelled voxel's patient coordinate is the centre of a masked
    source pixel (checks the geometry itself, not the references)."""
    sources = build_sources("oblique")
    result = distinct_masks(sources, two_segments=False)
    seg = hd.seg.Segmentation.from_dataset(_roundtrip(write_seg(result, sources, provenance)))
    vol = seg.get_volume(combine_segments=True)
    idx = np.argwhere(vol.array > 0)
    pts = (vol.affine @ np.c_[idx[:, :3], np.ones(len(idx))].T).T[:, :3]
    expected_pts = []
    for s in sources:
        mask = result.mask_for(str(s.SOPInstanceUID), int(s.Rows), int(s.Columns))[0]
        iop = np.array([float(v) for v in s.ImageOrientationPatient])
        ipp = np.array([float(v) for v in s.ImagePositionPatient])
        dr, dc = (float(v) for v in s.PixelSpacing)
        for r, c in np.argwhere(mask):
            expected_pts.append(ipp + iop[:3] * c * dc + iop[3:] * r * dr)
    assert len(pts) == len(expected_pts)
    got = np.round(np.array(sorted(map(tuple, np.round(pts, 2)))), 2)
    want = np.round(np.array(sorted(map(tuple, np.round(np.array(expected_pts), 2)))), 2)
    assert np.allclose(got, want, atol=0.02)


def test_labelmap_refused_can_be_rerendered_as_binary(provenance):
    sources = build_sources("descending")
    result = distinct_masks(sources)
    labelmap = _roundtrip(write_seg(result, sources, provenance, segmentation_type="LABELMAP"))
    assert labelmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    binary = _roundtrip(labelmap_to_binary(labelmap, sources, provenance))
    assert binary.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and binary.SegmentationType == "BINARY"
    assert binary.SeriesInstanceUID == labelmap.SeriesInstanceUID
    assert binary.SOPInstanceUID != labelmap.SOPInstanceUID
    lm_tracking = [i.TrackingUID for i in labelmap.SegmentSequence if i.SegmentNumber != 0]
    assert [i.TrackingUID for i in binary.SegmentSequence] == lm_tracking
    _assert_same(_highdicom_pixels(binary, sources), _expected(result, sources), "re-rendered BINARY")


def test_labelmap_rejects_overlap_with_clear_error(provenance):
    sources = build_sources("ascending")
    m = np.zeros((2, 32, 32), bool)
    m[:, 4:8, 4:8] = True
    result = SegmentationResult([Segment("a"), Segment("b")], {str(sources[0].SOPInstanceUID): m})
    with pytest.raises(ValueError, match="overlapping"):
        write_seg(result, sources, provenance, segmentation_type="LABELMAP")
    write_seg(result, sources, provenance)  # BINARY allows overlap


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s[1].__setattr__("SeriesInstanceUID", "1.2.3"), "more than one series"),
        (lambda s: s[1].__setattr__("FrameOfReferenceUID", "1.2.3"), "FrameOfReferenceUID"),
        (lambda s: s[1].__delattr__("ImagePositionPatient"), "ImagePositionPatient"),
        (lambda s: s[1].__setattr__("ImagePositionPatient", list(s[0].ImagePositionPatient)), "share one slice"),
        (lambda s: s[1].__setattr__("ImageOrientationPatient", [0, 1, 0, 0, 0, -1]), "ImageOrientationPatient"),
        (lambda s: s[1].__setattr__("StudyInstanceUID", "1.2.3"), "one study"),
    ],
)
def test_bad_sources_get_clear_errors(mutate, message, provenance):
    sources = build_sources("ascending")
    mutate(sources)
    with pytest.raises(SourceError, match=message):
        write_seg(distinct_masks(sources), sources, provenance)


def test_mask_errors(provenance):
    sources = build_sources("ascending")
    wrong_shape = SegmentationResult([Segment("a")], {str(sources[0].SOPInstanceUID): np.zeros((16, 16), bool)})
    with pytest.raises(ValueError, match="expected"):
        write_seg(wrong_shape, sources, provenance)
    unknown = SegmentationResult([Segment("a")], {"1.2.3.4": np.zeros((32, 32), bool)})
    with pytest.raises(SourceError, match="not among the sources"):
        write_seg(unknown, sources, provenance)
    with pytest.raises(ValueError, match="segmentation_type"):
        write_seg(distinct_masks(sources), sources, provenance, segmentation_type="FRACTIONAL")


def test_multiframe_without_plane_positions_is_refused(provenance):
    """pydicom's emri_small.dcm (Enhanced MR) has no functional groups: no geometry, clear error."""
    from .sources import _testdata

    ds = _testdata("emri_small.dcm")
    result = SegmentationResult([Segment("a")], {(str(ds.SOPInstanceUID), 1): np.zeros((64, 64), bool)})
    with pytest.raises(SourceError, match="PlanePositionSequence"):
        write_seg(result, [ds], provenance)


def test_binary_fallback_for_the_exporter(provenance):
    from sr_writers import binary_fallback

    sources = build_sources("oblique")
    result = distinct_masks(sources)
    convert = binary_fallback(sources, provenance)
    data = convert(to_bytes(write_seg(result, sources, provenance, segmentation_type="LABELMAP")))
    binary = pydicom.dcmread(io.BytesIO(data))
    assert binary.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    _assert_same(_highdicom_pixels(binary, sources), _expected(result, sources), "fallback bytes")
    assert convert(b"not dicom") is None
    other = build_sources("ascending")
    assert convert(to_bytes(write_seg(distinct_masks(other), other, provenance, segmentation_type="LABELMAP"))) is None
