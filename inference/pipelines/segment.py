"""segment: per selected slice and target, the edit flow draws a mask -> SEG + TID 1500 measurements.

Each selected slice goes to ``engine.edit_image`` with the target's instruction; the returned
mask picture (at the model's resolution) is thresholded after bilinear resampling onto the exact
source rows x columns, so every SEG frame lies on its source slice's grid.

The SEG covers the analysed slices only (single-frame series): a slice the model never looked
at is not claimed to be empty. With ``slices: all`` that is the whole series; with a sample of
slices the TID 1500 SR keeps the per-slice areas but drops the volumes, which would undercount. A multi-frame
source is one object, so its unselected frames are present and empty. Every analysed slice
keeps a frame per segment, found or not (the writer's ``omit_empty_frames=False``), so viewers
that stack frames by index line up too.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from inference.preprocess import ModelImage, mask_from_output
from sr_writers import Provenance, Segment, SegmentationResult, SourceError, write_measurements_sr, write_seg
from sr_writers.geometry import source_geometry
from sr_writers.results import SourceFrameKey

from .base import (
    Engine,
    PipelineOutput,
    Progress,
    SeriesInput,
    Target,
    TaskParams,
    as_rgb8,
    prepare_images,
    report_progress,
)
from .errors import PipelineError, readable_errors

SEG_SERIES_NUMBER = 9002
MEASUREMENTS_SERIES_NUMBER = 9003
VOLUME = codes.SCT.Volume


def frame_key(image: ModelImage, multiframe: bool) -> SourceFrameKey:
    """The writer's key for a source frame (multi-frame frame numbers start at 1)."""
    return (image.sop_instance_uid, image.frame_index + 1) if multiframe else image.sop_instance_uid


def resolve_overlaps(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """(segments, rows, cols) -> the same with each pixel in at most one segment (the first listed
    target wins), for LABELMAP output; returns the masks and the number of pixels reassigned."""
    claimed = np.zeros(masks.shape[1:], dtype=bool)
    out = masks.copy()
    moved = 0
    for s in range(out.shape[0]):
        clash = out[s] & claimed
        moved += int(clash.sum())
        out[s] &= ~claimed
        claimed |= out[s]
    return out, moved


def drop_volumes(sr: Dataset) -> int:
    """Remove the Volume measurements from a TID 1500 content tree; returns how many were removed.

    A volume summed over a sample of slices (key:N, every:K) is not the lesion's volume; the
    per-slice areas stay true. A volumetric group without measurements is valid TID 1411."""
    removed = 0
    for item in sr.get("ContentSequence", []):
        removed += drop_volumes(item)
    if "ContentSequence" in sr:
        keep = [i for i in sr.ContentSequence if not _is_volume(i)]
        removed += len(sr.ContentSequence) - len(keep)
        sr.ContentSequence = DicomSequence(keep)
    return removed


def _is_volume(item: Dataset) -> bool:
    if item.get("ValueType") != "NUM" or "ConceptNameCodeSequence" not in item:
        return False
    code = item.ConceptNameCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator)) == (VOLUME.value, VOLUME.scheme_designator)


def segment_descriptions(targets: tuple[Target, ...], provenance: Provenance) -> list[Segment]:
    return [
        Segment(
            label=t.label,
            category=t.category,
            property_type=t.property_type,
            algorithm_name=f"{provenance.model_name} edit-flow segmentation"[:64],
            algorithm_version=provenance.model_version,
        )
        for t in targets
    ]


def run_segment(
    series: SeriesInput,
    params: TaskParams,
    engine: Engine,
    provenance: Provenance,
    out: PipelineOutput,
    progress: Progress | None = None,
) -> None:
    multiframe = any(int(d.get("NumberOfFrames", 1) or 1) > 1 for d in series.datasets)
    if multiframe and len(series.datasets) != 1:
        raise PipelineError("a series mixing multi-frame objects with other instances cannot be segmented as one")
    with readable_errors("checking the source geometry"):
        try:
            source_geometry(series.datasets)
        except SourceError as exc:
            # The writer's wording ("need one common FrameOfReferenceUID") reads as if several
            # disagreed; when the source has none at all, say so.
            if "FrameOfReferenceUID" in str(exc) and any(
                not str(d.get("FrameOfReferenceUID", "") or "") for d in series.datasets
            ):
                raise PipelineError(
                    "the source series has no Frame of Reference UID (FrameOfReferenceUID is missing or "
                    "empty), so a segmentation cannot be placed on it"
                ) from exc
            raise  # before any model time is spent: can a SEG be placed at all?
    images = prepare_images(series, params, out)
    masks: dict[SourceFrameKey, np.ndarray] = {}
    total, done = len(images) * len(params.targets), 0
    reassigned = 0
    for img in images:
        stack = np.zeros((len(params.targets), img.source_rows, img.source_columns), dtype=bool)
        for s, target in enumerate(params.targets):
            report_progress(progress, done, total)
            with readable_errors(f"segmenting {target.label!r}"):
                drawn = engine.edit_image(
                    img.pixels, target.instruction, steps=params.steps, seed=params.seed, **params.image_options()
                )
            mask_image = as_rgb8(drawn, "mask image")
            with readable_errors(f"segmenting {target.label!r}"):
                stack[s] = mask_from_output(mask_image, img.source_rows, img.source_columns, target.threshold)
            done += 1
        if params.labelmap:
            stack, moved = resolve_overlaps(stack)
            reassigned += moved
        masks[frame_key(img, multiframe)] = stack
    if reassigned:
        out.note(f"LABELMAP: {reassigned} pixel(s) found for several targets were given to the first listed target")
    if multiframe:
        sources = series.datasets
        n_frames = int(series.datasets[0].NumberOfFrames)
        partial = len(images) < n_frames
        if partial:
            out.note(f"segmented {len(images)} of {n_frames} frames (slices={params.slices!r}); the others are empty")
    else:
        analysed = {img.sop_instance_uid for img in images}
        sources = [d for d in series.datasets if str(d.SOPInstanceUID) in analysed]
        partial = len(sources) < len(series.datasets)
        if partial:
            out.note(
                f"segmented {len(sources)} of {len(series.datasets)} slices (slices={params.slices!r}); "
                "the SEG covers those slices"
            )
    result = SegmentationResult(segments=segment_descriptions(params.targets, provenance), masks=masks)
    seg_type = "LABELMAP" if params.labelmap else "BINARY"
    with readable_errors("writing the segmentation"):
        seg = write_seg(
            result,
            sources,
            provenance,
            segmentation_type=seg_type,
            omit_empty_frames=False,
            series_number=SEG_SERIES_NUMBER,
        )
    out.add(seg, "seg", series.series_instance_uid)
    if params.labelmap:
        # sr_writers' TID 1500 writer locates SEG frames by per-frame segment number, which a
        # LABELMAP frame (all segments in one frame) does not carry; no measurements rather than wrong ones.
        out.note("no TID 1500 measurement SR for a LABELMAP segmentation (the writer supports BINARY only)")
    else:
        with readable_errors("writing the measurements SR"):
            sr = write_measurements_sr(result, seg, sources, provenance, series_number=MEASUREMENTS_SERIES_NUMBER)
        if partial:
            drop_volumes(sr)
            out.note("no volumes in the measurement SR: only some slices were segmented (use slices: all)")
        out.add(sr, "tid1500", series.series_instance_uid)
    out.results.append(
        {
            "series_instance_uid": series.series_instance_uid,
            "segmentation_type": seg_type,
            "slices": len(images),
            "segments": [
                {
                    "label": t.label,
                    "pixels": int(sum(int(m[i].sum()) for m in masks.values())),
                    "slices_with_finding": int(sum(bool(m[i].any()) for m in masks.values())),
                }
                for i, t in enumerate(params.targets)
            ],
        }
    )
    report_progress(progress, total, total)
