"""TID 1500 measurement report: areas per slice, volumes, references to SEG segments and source series."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest

from sr_writers import to_bytes, write_measurements_sr, write_seg
from sr_writers.results import Segment, SegmentationResult

from .sources import build_sources, distinct_masks, frame_keys


def _write(case, provenance):
    sources = build_sources(case)
    result = distinct_masks(sources)
    seg = pydicom.dcmread(io.BytesIO(to_bytes(write_seg(result, sources, provenance))))
    sr = write_measurements_sr(result, seg, sources, provenance)
    return sources, result, seg, hd.sr.srread(io.BytesIO(to_bytes(sr))), sr


@pytest.mark.parametrize("case", ["oblique", "gaps", "legacy_enhanced_ct"])
def test_volume_and_area_values(case, provenance):
    sources, result, seg, parsed, sr = _write(case, provenance)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    thickness = 2.5  # synthetic series: SliceThickness 2.5 mm
    spacing = (0.8, 0.7)
    volumes = parsed.content.get_volumetric_roi_measurement_groups()
    assert len(volumes) == len(result.segments)
    for number, group in enumerate(volumes, start=1):
        voxels = sum(int(result.mask_for(k, 32, 32)[number - 1].sum()) for k in frame_keys(sources))
        [volume] = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
        assert volume.value == pytest.approx(voxels * spacing[0] * spacing[1] * thickness, rel=1e-6)
        assert volume.unit.value == "mm3"
        seg_item = seg.SegmentSequence[number - 1]
        assert group.tracking_uid == seg_item.TrackingUID  # SR and SEG track the same finding
        ref = group.reference_type
        assert ref.value == "121191"  # Referenced Segment
    planar = parsed.content.get_planar_roi_measurement_groups()
    nonempty = sum(int(m.any()) for mask in result.masks.values() for m in mask)
    assert len(planar) == nonempty
    areas = sorted(g.get_measurements()[0].value for g in planar)
    expected = sorted(
        float(m.sum()) * spacing[0] * spacing[1] for mask in result.masks.values() for m in mask if m.any()
    )
    assert np.allclose(areas, expected)
    assert len({g.tracking_uid for g in planar + volumes}) == len(planar) + len(volumes)


def test_groups_reference_seg_segment_frames_and_source_series(provenance):
    sources, result, seg, parsed, sr = _write("random", provenance)

    def walk(items):
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence", []))

    items = list(walk(sr.ContentSequence))
    seg_refs = [
        i for i in items if i.ValueType == "IMAGE" and i.ConceptNameCodeSequence[0].CodeValue in ("121191", "121214")
    ]
    assert seg_refs and all(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID for i in seg_refs)
    for i in seg_refs:
        ref = i.ReferencedSOPSequence[0]
        # a frame reference implies its segment; a segment reference has no frame (PS3.3 C.18.3)
        assert ("ReferencedFrameNumber" in ref) != ("ReferencedSegmentNumber" in ref)
        if "ReferencedFrameNumber" in ref:
            frame = seg.PerFrameFunctionalGroupsSequence[int(ref.ReferencedFrameNumber) - 1]
            src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            assert result.masks[src].any()
    series = [i.UID for i in items if i.ValueType == "UIDREF" and i.ConceptNameCodeSequence[0].CodeValue == "121232"]
    assert series and set(series) == {sources[0].SeriesInstanceUID}
    evidence = {
        r.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence and {s.SOPInstanceUID for s in sources} <= evidence


def test_empty_mask_gives_zero_volume_and_no_area_groups(provenance):
    sources = build_sources("ascending")
    result = SegmentationResult([Segment("nothing")], {})
    seg = write_seg(result, sources, provenance)
    parsed = hd.sr.srread(io.BytesIO(to_bytes(write_measurements_sr(result, seg, sources, provenance))))
    assert not parsed.content.get_planar_roi_measurement_groups()
    [group] = parsed.content.get_volumetric_roi_measurement_groups()
    assert group.get_measurements()[0].value == 0


def test_mismatched_seg_is_refused(provenance):
    sources = build_sources("ascending")
    result = distinct_masks(sources)
    other = build_sources("descending")
    seg_other = write_seg(distinct_masks(other), other, provenance)
    with pytest.raises(ValueError, match="Frames of Reference|study|series"):
        write_measurements_sr(result, seg_other, sources, provenance)
    with pytest.raises(ValueError, match="Segmentation"):
        write_measurements_sr(result, sources[0], sources, provenance)


def test_image_library_lists_the_measured_images(provenance):
    sources, result, seg, parsed, sr = _write("gaps", provenance)
    library = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028")
    listed = {
        e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for g in library.ContentSequence for e in g.ContentSequence
    }
    assert listed == {k for k, m in result.masks.items() if m.any()}
