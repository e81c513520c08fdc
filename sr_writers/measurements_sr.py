"""Comprehensive 3D SR, TID 1500 measurement report derived from a SEG.

Per segment one volumetric group (TID 1411): Volume in mm3, referencing the SEG segment and the
source series, tracked by the segment's own TrackingUID so SR and SEG name the same finding.
Per segment and non-empty slice one planar group (TID 1410): Area in mm2, referencing the SEG
frame of that slice and its source image. Volume = sum over slices of (pixel count x pixel area
x slice thickness), thickness from the source (SliceThickness / Pixel Measures), else the
spacing between slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from .common import (
    SourceError,
    apply_provenance,
    contributing_equipment,
    copy_identity,
    finish,
    series_description,
)
from .geometry import SourceFrame, fill_slice_thickness, source_geometry
from .report_sr import device_observer
from .results import Provenance, SegmentationResult
from .seg import LABELMAP_SOP_CLASS, SEG_SOP_CLASS, check_seg_matches_sources
from .source_prep import for_highdicom
from .uids import new_uid

IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


def _seg_frame_index(seg_ds: Dataset) -> dict[tuple[str, int | None, int], int]:
    """(source SOPInstanceUID, source frame number or None, segment number) -> SEG frame number."""
    out: dict[tuple[str, int | None, int], int] = {}
    shared = seg_ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg_ds else Dataset()
    for number, item in enumerate(seg_ds.PerFrameFunctionalGroupsSequence, start=1):
        # With one segment highdicom moves the Segment Identification into the shared groups.
        ident = item if "SegmentIdentificationSequence" in item else shared
        segment = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for deriv in item.get("DerivationImageSequence", []):
            for src in deriv.get("SourceImageSequence", []):
                frames = src.get("ReferencedFrameNumber")
                frame = int(frames if not isinstance(frames, list | tuple) else frames[0]) if frames else None
                out[(str(src.ReferencedSOPInstanceUID), frame, segment)] = number
    return out


def _source_image(frame: SourceFrame) -> hd.sr.SourceImageForSegmentation:
    return hd.sr.SourceImageForSegmentation(
        referenced_sop_class_uid=frame.sop_class_uid,
        referenced_sop_instance_uid=frame.sop_instance_uid,
        referenced_frame_numbers=[frame.frame_number] if frame.frame_number else None,
    )


def _drop_segment_number_beside_frame(items) -> None:
    """PS3.3 C.18.3: an IMAGE reference to a SEG carries ReferencedSegmentNumber only when it has no
    ReferencedFrameNumber (a SEG frame already belongs to exactly one segment). highdicom 0.28.2's
    ReferencedSegmentationFrame writes both, which dciodvfy and dsrdump reject; the frame stays."""
    for item in items:
        for ref in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in ref and "ReferencedSegmentNumber" in ref:
                del ref.ReferencedSegmentNumber
        _drop_segment_number_beside_frame(item.get("ContentSequence", []))


def _measured_images(result: SegmentationResult, geom) -> list[Dataset]:
    keys = {k for k, m in result.masks.items() if np.asarray(m).any()}
    measured = [ds for ds, f in zip(geom.datasets, geom.frames, strict=True) if f.key in keys]
    return measured or list(geom.datasets)


def write_measurements_sr(
    result: SegmentationResult,
    seg_ds: Dataset,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    per_slice_areas: bool = True,
    series_number: int = 9003,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
) -> Dataset:
    """TID 1500 measurement report (areas per slice, volumes) for the segments of ``seg_ds``."""
    if str(seg_ds.SOPClassUID) not in (SEG_SOP_CLASS, LABELMAP_SOP_CLASS):
        raise ValueError("seg_ds must be a Segmentation written for these sources")
    sources, replaced = for_highdicom(sources)
    geom = source_geometry(sources)
    fill_slice_thickness(geom)
    check_seg_matches_sources(seg_ds, geom)
    seg_items = {int(i.SegmentNumber): i for i in seg_ds.SegmentSequence if int(i.SegmentNumber) != 0}
    if len(seg_items) != len(result.segments):
        raise ValueError("the SEG and the segmentation result describe different numbers of segments")
    frame_index = _seg_frame_index(seg_ds)
    groups: list = []
    for number, segment in enumerate(result.segments, start=1):
        item = seg_items[number]
        algo = hd.sr.AlgorithmIdentification(
            name=segment.algorithm_name[:64], version=(segment.algorithm_version or provenance.model_version)[:64]
        )
        finding = CodedConcept(segment.property_type.value, segment.property_type.scheme, segment.property_type.meaning)
        volume = 0.0
        thickness_known = True
        for frame in geom.frames:
            mask = result.mask_for(frame.key, geom.rows, geom.columns)[number - 1]
            count = int(mask.sum())
            if not count:
                continue
            area = count * frame.pixel_spacing[0] * frame.pixel_spacing[1]
            thickness = frame.slice_thickness or geom.slice_spacing
            if thickness is None:
                thickness_known = False
            else:
                volume += area * thickness
            if not per_slice_areas:
                continue
            seg_frame = frame_index.get((frame.sop_instance_uid, frame.frame_number, number))
            if seg_frame is None:
                raise SourceError(f"SEG has no frame for segment {number} on a masked source frame")
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=new_uid(provenance.uid_root),
                        identifier=f"{segment.label} slice {geom.frames.index(frame) + 1}"[:64],
                    ),
                    referenced_segment=hd.sr.ReferencedSegmentationFrame(
                        sop_class_uid=str(seg_ds.SOPClassUID),
                        sop_instance_uid=str(seg_ds.SOPInstanceUID),
                        frame_number=seg_frame,
                        segment_number=number,
                        source_image=_source_image(frame),
                    ),
                    finding_type=finding,
                    algorithm_id=algo,
                    measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=area, unit=codes.UCUM.SquareMillimeter)],
                )
            )
        measurements = []
        if thickness_known:
            measurements.append(hd.sr.Measurement(name=codes.SCT.Volume, value=volume, unit=codes.UCUM.CubicMillimeter))
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=str(item.get("TrackingUID", "")) or new_uid(provenance.uid_root),
                    identifier=str(item.get("TrackingID", "")) or segment.label[:64],
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg_ds.SOPClassUID),
                    sop_instance_uid=str(seg_ds.SOPInstanceUID),
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(geom.series_instance_uid),
                ),
                finding_type=finding,
                algorithm_id=algo,
                measurements=measurements or None,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer(provenance)),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
        # The Image Library lists the images the measurements were made on (the masked slices); highdicom
        # 0.28.2 builds its entries from top-level geometry only, so multi-frame sources get none.
        referenced_images=None if geom.multiframe else _measured_images(result, geom),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*geom.datasets, seg_ds],
        content=report[0],
        series_instance_uid=series_instance_uid or new_uid(provenance.uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(provenance.uid_root),
        instance_number=instance_number,
        manufacturer=provenance.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=provenance.institution_name,
        contributing_equipment=[contributing_equipment(provenance, "processing", "AI measurements from segmentation")],
    )
    _drop_segment_number_beside_frame(sr.ContentSequence)
    copy_identity(sr, geom.datasets[0])
    apply_provenance(sr, provenance)
    sr.SeriesDescription = series_description("Measurements", provenance)
    return finish(sr, provenance.uid_root, replaced)
