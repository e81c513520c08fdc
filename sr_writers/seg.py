"""DICOM Segmentation (SEG) from per-source-frame masks.

BINARY (Segmentation Storage, 66.4) is the default: it is what OHIF 3.x, Weasis and every PACS
accept. LABELMAP (Label Map Segmentation Storage, 66.7, Sup 243) can be selected; archives or
validators that predate it refuse it, so ``labelmap_to_binary`` re-renders such an object as BINARY.

Empty frames are kept by default (``omit_empty_frames=False``): every source frame gets a SEG
frame per segment, so a viewer that stacks SEG frames by index (rather than by their per-frame
source reference or position) still lines them up with the source. A BINARY frame costs
rows*cols/8 bytes, a 100-slice 256x256 series with one segment about 0.8 MB.

A BINARY SEG whose Rows x Columns is not a multiple of 8 (15x17, 181x217) is written in RLE
Lossless, one fragment per frame, each frame's bits packed from its own first byte (PS3.5 8.1.1,
8.2; Annex G). Natively such frames run on without byte alignment, and OHIF's Cornerstone adapter
(@cornerstonejs/adapters 5.x) then guesses the layout from the Pixel Data length, which is the
same for both layouts below 8 frames for a 15x17 grid, and paints masks shifted by some bits.
``native_binary`` turns such an object back into Explicit VR Little Endian for readers (pydicom,
highdicom) that do not decode 1-bit RLE.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Callable, Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from .common import SourceError, apply_provenance, contributing_equipment, copy_identity, finish, series_description
from .geometry import SourceGeometry, fill_slice_thickness, source_geometry
from .results import Code, Provenance, Segment, SegmentationResult
from .source_prep import for_highdicom
from .uids import new_uid

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
SEGMENTATION_TYPES = ("BINARY", "LABELMAP")
log = logging.getLogger(__name__)


def _concept(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme, code.meaning)


def segment_descriptions(result: SegmentationResult, provenance: Provenance) -> list[hd.seg.SegmentDescription]:
    out = []
    for number, seg in enumerate(result.segments, start=1):
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=seg.label[:64],
                segmented_property_category=_concept(seg.category),
                segmented_property_type=_concept(seg.property_type),
                algorithm_type="AUTOMATIC",
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=seg.algorithm_name[:64],
                    family=codes.cid7162.ArtificialIntelligence,
                    version=(seg.algorithm_version or provenance.model_version)[:64],
                    source=provenance.manufacturer[:64],
                ),
                tracking_uid=seg.tracking_uid or new_uid(provenance.uid_root),
                tracking_id=(seg.tracking_id or seg.label)[:64],
                display_color=hd.color.CIELabColor.from_rgb(*seg.display_color_rgb) if seg.display_color_rgb else None,
            )
        )
    return out


def _array_order(geom: SourceGeometry) -> list[int]:
    """Index into geom.frames for each row of the array highdicom receives.

    highdicom pairs array row i with source dataset i (single-frame series, which we pass
    sorted) or with frame i+1 of a multi-frame source (frame-number order).
    """
    if not geom.multiframe:
        return list(range(len(geom.frames)))
    by_number = {f.frame_number: i for i, f in enumerate(geom.frames)}
    return [by_number[n] for n in range(1, len(geom.frames) + 1)]


def stacked_masks(result: SegmentationResult, geom: SourceGeometry) -> np.ndarray:
    """(frames, rows, cols, segments) bool in highdicom's source order; rejects unknown keys."""
    for key in result.masks:
        geom.index_of(key)
    frames = [geom.frames[i] for i in _array_order(geom)]
    stack = np.stack([result.mask_for(f.key, geom.rows, geom.columns) for f in frames])  # (F, S, R, C)
    return np.ascontiguousarray(np.moveaxis(stack, 1, -1))


def _labelmap(stack: np.ndarray) -> np.ndarray:
    overlap = stack.sum(axis=-1) > 1
    if overlap.any():
        frame = int(np.argwhere(overlap)[0][0])
        raise ValueError(
            f"LABELMAP segmentations cannot hold overlapping segments (overlap in source frame index {frame}); "
            "use BINARY"
        )
    labels = np.zeros(stack.shape[:3], dtype=np.uint8 if stack.shape[-1] < 256 else np.uint16)
    for s in range(stack.shape[-1]):
        labels[stack[..., s]] = s + 1
    return labels


def _packed_bytes_kwargs(n_bytes: int) -> dict:
    # 1-bit RLE (PS3.5 G.2): one byte segment holding the frame's packed bits; pydicom's RLE codec
    # encodes it as a one-row 8-bit image of those bytes.
    return dict(
        rows=1,
        columns=n_bytes,
        samples_per_pixel=1,
        bits_allocated=8,
        bits_stored=8,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )


def needs_frame_aligned_bits(rows: int, columns: int) -> bool:
    """True when native BINARY frames would not start on a byte boundary (rows*columns % 8 != 0)."""
    return (rows * columns) % 8 != 0


def _frame_bits(seg_ds: Dataset) -> np.ndarray:
    """(frames, rows*cols) uint8 0/1 from native contiguous little-endian bit packing (PS3.5 8.1.1)."""
    n, px = int(seg_ds.NumberOfFrames), int(seg_ds.Rows) * int(seg_ds.Columns)
    bits = np.unpackbits(np.frombuffer(seg_ds.PixelData, dtype=np.uint8), bitorder="little")
    return bits[: n * px].reshape(n, px)


def encapsulate_binary(seg_ds: Dataset) -> Dataset:
    """Re-encode a native BINARY SEG as RLE Lossless, one fragment per frame, bits packed per frame.

    In place; returns ``seg_ds``. Raises ValueError for anything but a native 1-bit SEG."""
    if int(seg_ds.BitsAllocated) != 1 or seg_ds.file_meta.TransferSyntaxUID.is_encapsulated:
        raise ValueError("encapsulate_binary needs a BINARY SEG with native (uncompressed) Pixel Data")
    fragments = []
    for frame in _frame_bits(seg_ds):
        packed = np.packbits(frame, bitorder="little").tobytes()
        fragments.append(
            RLELosslessEncoder.encode(packed, encoding_plugin="pydicom", **_packed_bytes_kwargs(len(packed)))
        )
    seg_ds.PixelData = encapsulate(fragments, has_bot=True)
    seg_ds["PixelData"].VR = "OB"
    seg_ds["PixelData"].is_undefined_length = True
    seg_ds.file_meta.TransferSyntaxUID = RLELossless
    return seg_ds


def native_binary(seg_ds: Dataset) -> Dataset:
    """A BINARY SEG in Explicit VR Little Endian (contiguous bits) from an RLE one written by
    ``encapsulate_binary``; any other dataset is returned unchanged. In place; returns ``seg_ds``."""
    meta = getattr(seg_ds, "file_meta", None)
    if meta is None or str(meta.get("TransferSyntaxUID", "")) != RLELossless or int(seg_ds.BitsAllocated) != 1:
        return seg_ds
    n, px = int(seg_ds.NumberOfFrames), int(seg_ds.Rows) * int(seg_ds.Columns)
    n_bytes = (px + 7) // 8
    decoder = get_decoder(RLELossless)
    frames = []
    for fragment in generate_frames(seg_ds.PixelData, number_of_frames=n):
        packed, _ = decoder.as_array(encapsulate([fragment]), **_packed_bytes_kwargs(n_bytes))
        frames.append(np.unpackbits(packed.reshape(-1), bitorder="little")[:px])
    seg_ds.PixelData = np.packbits(np.concatenate(frames), bitorder="little").tobytes()
    seg_ds["PixelData"].VR = "OB"
    seg_ds["PixelData"].is_undefined_length = False
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return seg_ds


def write_seg(
    result: SegmentationResult,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    segmentation_type: str = "BINARY",
    omit_empty_frames: bool = False,
    series_number: int = 9002,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    series_text: str = "Segmentation",
) -> Dataset:
    """SEG on the source grid and Frame of Reference, one frame per source frame and segment.

    BINARY SEGs on grids whose Rows x Columns is not a multiple of 8 come back RLE encoded (see
    the module docstring). Raises SourceError (NoFrameOfReferenceError, NoPatientGeometryError) for
    sources a mask cannot be placed on, ValueError for overlapping LABELMAP segments."""
    seg_type = segmentation_type.upper()
    if seg_type not in SEGMENTATION_TYPES:
        raise ValueError(f"segmentation_type must be one of {SEGMENTATION_TYPES}, not {segmentation_type!r}")
    sources, replaced = for_highdicom(sources)
    geom = source_geometry(sources)
    fill_slice_thickness(geom)
    stack = stacked_masks(result, geom)
    pixels = _labelmap(stack) if seg_type == "LABELMAP" else stack
    seg = hd.seg.Segmentation(
        source_images=geom.datasets,
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=segment_descriptions(result, provenance),
        series_instance_uid=series_instance_uid or new_uid(provenance.uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(provenance.uid_root),
        instance_number=instance_number,
        manufacturer=provenance.manufacturer,
        manufacturer_model_name=provenance.model_label,
        software_versions=provenance.versions[0],  # full list set by apply_provenance
        device_serial_number=provenance.serial_number,
        content_description=f"AI segmentation by {provenance.model_name}"[:64],
        content_label="AI_SEG",
        omit_empty_frames=omit_empty_frames,
        contributing_equipment=[contributing_equipment(provenance, "processing", "AI segmentation")],
    )
    copy_identity(seg, geom.datasets[0])
    apply_provenance(seg, provenance)
    seg.SeriesDescription = series_description(series_text, provenance)
    if "BodyPartExamined" in geom.datasets[0]:
        seg.BodyPartExamined = geom.datasets[0].BodyPartExamined
    if seg_type == "BINARY" and needs_frame_aligned_bits(geom.rows, geom.columns):
        encapsulate_binary(seg)
    return finish(seg, provenance.uid_root, replaced)


def _code(seq) -> Code:
    item = seq[0]
    return Code(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def segments_from_dataset(seg_ds: Dataset) -> list[Segment]:
    """Segment descriptions of a written SEG (background segment 0 of a LABELMAP left out)."""
    out = []
    for item in seg_ds.SegmentSequence:
        if int(item.SegmentNumber) == 0:
            continue
        algo = item.get("SegmentationAlgorithmIdentificationSequence", [Dataset()])[0]
        out.append(
            Segment(
                label=str(item.SegmentLabel),
                category=_code(item.SegmentedPropertyCategoryCodeSequence),
                property_type=_code(item.SegmentedPropertyTypeCodeSequence),
                algorithm_name=str(algo.get("AlgorithmName", "unknown")),
                algorithm_version=str(algo.get("AlgorithmVersion", "unknown")),
                tracking_id=str(item.get("TrackingID", "")) or None,
                tracking_uid=str(item.get("TrackingUID", "")) or None,
            )
        )
    return out


def check_seg_matches_sources(seg_ds: Dataset, geom: SourceGeometry) -> None:
    """Refuse to decode a SEG against sources it was not made from: empty masks would be the
    silent result, and a re-rendered object would then carry a wrong (empty) segmentation."""
    if str(seg_ds.get("FrameOfReferenceUID", "")) != geom.frame_of_reference_uid:
        raise SourceError("SEG and sources have different Frames of Reference")
    series = {str(item.SeriesInstanceUID) for item in seg_ds.get("ReferencedSeriesSequence", [])}
    if geom.series_instance_uid not in series:
        raise SourceError("SEG does not reference the series of these sources")
    known = {f.sop_instance_uid for f in geom.frames}
    for item in seg_ds.PerFrameFunctionalGroupsSequence:
        for deriv in item.get("DerivationImageSequence", []):
            for src in deriv.get("SourceImageSequence", []):
                if str(src.ReferencedSOPInstanceUID) not in known:
                    raise SourceError("SEG frame references an image that is not among the sources")


def read_masks(seg_ds: Dataset, sources: Sequence[Dataset]) -> SegmentationResult:
    """Decode a SEG (BINARY or LABELMAP) back into per-source-frame masks, matched by source reference."""
    geom = source_geometry(sources)
    check_seg_matches_sources(seg_ds, geom)
    seg = hd.seg.Segmentation.from_dataset(native_binary(copy.deepcopy(seg_ds)), copy=False)
    segments = segments_from_dataset(seg_ds)
    numbers = [int(i.SegmentNumber) for i in seg_ds.SegmentSequence if int(i.SegmentNumber) != 0]
    if geom.multiframe:
        uid = geom.frames[0].sop_instance_uid
        numbers_f = sorted(int(f.frame_number) for f in geom.frames)  # type: ignore[arg-type]
        arr = seg.get_pixels_by_source_frame(
            uid, numbers_f, segment_numbers=numbers, assert_missing_frames_are_empty=True
        )
        keys = [(uid, n) for n in numbers_f]
    else:
        keys = [f.sop_instance_uid for f in geom.frames]
        arr = seg.get_pixels_by_source_instance(keys, segment_numbers=numbers, assert_missing_frames_are_empty=True)
    masks = {k: np.moveaxis(arr[i] > 0, -1, 0) for i, k in enumerate(keys)}
    return SegmentationResult(segments=segments, masks=masks)


def labelmap_to_binary(seg_ds: Dataset, sources: Sequence[Dataset], provenance: Provenance) -> Dataset:
    """Re-render a LABELMAP SEG as BINARY (same series, segment identities and tracking UIDs).

    For archives that refuse the Label Map Segmentation SOP class: the export layer calls this
    and sends the result instead. The new object gets a new SOPInstanceUID (different SOP class).
    """
    if str(seg_ds.SOPClassUID) != LABELMAP_SOP_CLASS:
        raise ValueError("labelmap_to_binary needs a Label Map Segmentation (1.2.840.10008.5.1.4.1.1.66.7)")
    result = read_masks(seg_ds, sources)
    return write_seg(
        result,
        sources,
        provenance,
        segmentation_type="BINARY",
        series_number=int(seg_ds.get("SeriesNumber", 9002) or 9002),
        instance_number=int(seg_ds.get("InstanceNumber", 1) or 1) + 1,
        series_instance_uid=str(seg_ds.SeriesInstanceUID),
        series_text=str(seg_ds.get("SeriesDescription", "Segmentation")),
    )


def binary_fallback(sources: Sequence[Dataset], provenance: Provenance) -> Callable[[bytes], bytes | None]:
    """A callable for the export layer: LABELMAP Part 10 bytes -> BINARY Part 10 bytes, or None.

    None means the bytes could not be re-rendered against these sources (not a LABELMAP SEG, or
    not of this series); the caller then ends the delivery in a clear failed state.
    """
    from .common import to_bytes

    def convert(data: bytes) -> bytes | None:
        try:
            labelmap = dcmread(io.BytesIO(data))
            return to_bytes(labelmap_to_binary(labelmap, sources, provenance))
        except (InvalidDicomError, SourceError, ValueError, KeyError, AttributeError) as exc:
            log.warning("LABELMAP to BINARY re-rendering failed: %s", type(exc).__name__)
            return None

    return convert
