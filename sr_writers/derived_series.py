"""Derived series in the source SOP class for image-to-image results on a volume.

Each output instance is its source's header with the model's pixels: same SOP class, study,
Frame of Reference and patient geometry (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, SliceThickness), so MPR, linking and hanging protocols keep working. It gets a new
series and SOP instance UIDs, ImageType DERIVED\\SECONDARY, SourceImageSequence + derivation
description/code, SyntheticData, the AI model as General Equipment and the scanner plus the model
in ContributingEquipmentSequence. Private tags and everything that described the old pixels
(window, LUTs, padding, smallest/largest values, icons, overlays) are dropped. Pixels are stored
uncompressed in the source's pixel format where the IOD fixes it (PS3.3 C.7.6.3, C.8.5.6 for US):

- 8-bit monochrome sources stay 8-bit (BitsAllocated, BitsStored, HighBit, PixelRepresentation and
  any Rescale as the source), values clipped to the range BitsStored allows;
- colour sources (RGB, YBR_*, PALETTE COLOR) give RGB, 8 bit, PlanarConfiguration 0; a 2-D result
  for a colour source is written as grey RGB;
- 16-bit monochrome sources give 16 bit, signed only when the values need it, Rescale 1/0 where
  the IOD has a Modality LUT.

Retired source SOP classes (e.g. the 1993 Ultrasound Image Storage) are written in their
successor class; text is UTF-8 and absent Type 2 identity attributes are present and empty
(``source_prep``). Multi-frame sources give one multi-frame derived instance (see
write_derived_series); frames without functional groups that need geometry are refused.

If an output array is larger or smaller than the source (super-resolution), PixelSpacing is
scaled so the field of view is unchanged and ImagePositionPatient moves to the new first pixel
centre.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian

from .common import (
    SourceError,
    apply_provenance,
    check_same_study,
    contributing_equipment,
    copy_body_part_and_laterality,
    finish,
    series_description,
)
from .errors import UnsupportedSourceError
from .geometry import is_multiframe
from .results import DerivedImages, Provenance
from .source_prep import current_sop_class, writable_sources
from .uids import new_uid

# Attributes that describe the source's pixel values or encoding and would lie about ours.
_DROP = (
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
    "ModalityLUTSequence",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "IconImageSequence",
    "PlanarConfiguration",
    "DerivationDescription",
    "DerivationCodeSequence",
    "SourceImageSequence",
    "DigitalSignaturesSequence",
    "EncryptedAttributesSequence",
    "MACParametersSequence",
    "ReferencedImageSequence",
    "DataSetTrailingPadding",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
)
_LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.93": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}
# IODs whose image module includes the Modality LUT (rescale) attributes.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_PATIENT_POSITION_CLASSES = {CT_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.4"}  # CT, MR Image Storage
_RESCALE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX
    "1.2.840.10008.5.1.4.1.1.20",  # NM
}


def _header_copy(src: Dataset) -> Dataset:
    """Deep copy of the header without pixel-describing, private and overlay/curve elements.

    Deep, because pydicom assigns into an existing DataElement: a shared element would let our
    edits leak back into the caller's source dataset."""
    ds = Dataset()
    for elem in src:
        group = elem.tag.group
        if elem.tag.is_private or 0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF:
            continue
        if elem.keyword in _DROP:
            continue
        ds.add(copy.deepcopy(elem))
    return ds


def _encode(values: np.ndarray) -> tuple[bytes, int]:
    """Round to integers and store as 16-bit; returns (bytes, PixelRepresentation)."""
    if not np.all(np.isfinite(values)):
        raise ValueError("derived pixels contain NaN or infinite values")
    ints = np.rint(values).astype(np.int64)
    lo, hi = int(ints.min()), int(ints.max())
    if lo >= 0 and hi <= 0xFFFF:
        return ints.astype("<u2").tobytes(), 0
    if lo >= -0x8000 and hi <= 0x7FFF:
        return ints.astype("<i2").tobytes(), 1
    raise ValueError(f"derived pixel values {lo}..{hi} do not fit in 16 bits")


COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def _stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)


def _check_finite(values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError("derived pixels contain NaN or infinite values")


def _store_8bit_monochrome(ds: Dataset, src: Dataset, values: np.ndarray) -> None:
    """Modality values -> stored values in the source's 8-bit format, source rescale kept, clipped."""
    _check_finite(values)
    slope = float(src.get("RescaleSlope", 1) or 1)
    intercept = float(src.get("RescaleIntercept", 0) or 0)
    bits_stored = int(src.get("BitsStored", 8) or 8)
    signed = int(src.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = _stored_range(min(bits_stored, 8), signed)
    stored = np.clip(np.rint((values - intercept) / slope), lo, hi)
    ds.PixelData = stored.astype(np.int8 if signed else np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, min(bits_stored, 8), min(bits_stored, 8) - 1
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = src.PhotometricInterpretation


def _store_rgb(ds: Dataset, values: np.ndarray, grey: bool) -> None:
    """([frames,] rows, cols, 3), or grey without the last axis -> RGB 8 bit, colour-by-pixel
    (PS3.3 C.7.6.3.1.3)."""
    _check_finite(values)
    rgb = np.repeat(values[..., None], 3, axis=-1) if grey else values
    ds.PixelData = np.clip(np.rint(rgb), 0, 255).astype(np.uint8).tobytes()
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
        if kw in ds:
            delattr(ds, kw)


def _store_16bit_monochrome(ds: Dataset, src: Dataset, values: np.ndarray, keep_source_window: bool) -> None:
    data, signed = _encode(values.astype(np.float64, copy=False))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, signed
    if str(src.SOPClassUID) in _RESCALE_SOP_CLASSES or "RescaleSlope" in src:
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        if "RescaleType" in src:
            ds.RescaleType = src.RescaleType
        elif str(src.SOPClassUID) != CT_IMAGE_STORAGE:
            # The Modality LUT module needs RescaleType with a rescale (CT implies HU): unspecified.
            ds.RescaleType = "US"
    ds.PixelData = data


def _pixel_shape_ok(pixels: np.ndarray, colour: bool) -> bool:
    if pixels.ndim == 2:
        return min(pixels.shape) >= 1
    return colour and pixels.ndim == 3 and pixels.shape[2] == 3 and min(pixels.shape[:2]) >= 1


def _fill_type2(ds: Dataset, enhanced: bool = False) -> None:
    """Type 2 / 2C attributes of the image modules a copied header may lack (PS3.3 C.7.6.1)."""
    if "InstanceNumber" not in ds:
        ds.InstanceNumber = None
    if enhanced:  # orientation and position live in the functional groups
        return
    if "ImageOrientationPatient" not in ds and "PatientOrientation" not in ds:
        ds.PatientOrientation = None  # 2C: required without patient geometry; empty = unknown
    if str(ds.get("SOPClassUID", "")) in _PATIENT_POSITION_CLASSES and "PatientPosition" not in ds:
        ds.PatientPosition = None  # General Series 2C for CT and MR (C.7.3.1): unknown
    if str(ds.get("SOPClassUID", "")) == CT_IMAGE_STORAGE and "AcquisitionNumber" not in ds:
        ds.AcquisitionNumber = None  # CT Image Type 2 (C.8.2.1)


def _resample_geometry(ds: Dataset, rows: int, cols: int) -> None:
    """Keep the field of view when the output grid differs from the source grid."""
    old_rows, old_cols = int(ds.Rows), int(ds.Columns)
    if (rows, cols) == (old_rows, old_cols):
        return
    row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
    new_row_sp, new_col_sp = row_sp * old_rows / rows, col_sp * old_cols / cols
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    # IOP[:3] points along a row (increasing column index, spacing PixelSpacing[1]).
    shift = iop[:3] * (new_col_sp - col_sp) / 2 + iop[3:] * (new_row_sp - row_sp) / 2
    ds.ImagePositionPatient = [round(float(v), 6) for v in ipp + shift]
    ds.PixelSpacing = [round(new_row_sp, 8), round(new_col_sp, 8)]


def _window(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [1, 99])
    return round(float(lo + hi) / 2, 2), round(max(float(hi - lo), 1.0), 2)


def _lossy_history(ds: Dataset, src: Dataset) -> None:
    """LossyImageCompression: once 01 it stays 01 for everything derived (PS3.3 C.7.6.1.1.5)."""
    ts = str(getattr(getattr(src, "file_meta", None), "TransferSyntaxUID", "") or "")
    if str(src.get("LossyImageCompression", "")) == "01":
        ds.LossyImageCompression = "01"
    elif ts in _LOSSY_SYNTAXES:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = _LOSSY_SYNTAXES[ts]
    elif "LossyImageCompression" in ds:
        ds.LossyImageCompression = "00"


def _acquisition_equipment(src: Dataset) -> Dataset | None:
    if not src.get("Manufacturer"):
        return None
    item = Dataset()
    item.Manufacturer = src.Manufacturer
    if src.get("ManufacturerModelName"):
        item.ManufacturerModelName = src.ManufacturerModelName
    if src.get("DeviceSerialNumber"):
        item.DeviceSerialNumber = src.DeviceSerialNumber
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "109101", "DCM", "Acquisition Equipment"
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def _frames_for(result: DerivedImages, src: Dataset) -> np.ndarray | None:
    """The result's pixels for one source: (rows, cols[, 3]) for a single-frame source; for a
    multi-frame source (frames, rows, cols[, 3]) from one array or from (uid, frame number) keys."""
    uid = str(src.SOPInstanceUID)
    if uid in result.pixels:
        return np.asarray(result.pixels[uid])
    keys = sorted(k for k in result.pixels if isinstance(k, tuple) and str(k[0]) == uid)  # type: ignore[misc]
    if not keys:
        return None
    n = int(src.get("NumberOfFrames", 1) or 1)
    if [int(k[1]) for k in keys] != list(range(1, n + 1)):  # type: ignore[index]
        raise ValueError(f"a derived multi-frame image needs pixels for all {n} frames of its source")
    return np.stack([np.asarray(result.pixels[k]) for k in keys])  # type: ignore[index]


def _check_shape(pixels: np.ndarray, colour: bool, frames: int | None) -> None:
    plane = pixels if frames is None else (pixels[0] if pixels.ndim >= 3 else pixels)
    if frames is not None and (pixels.ndim < 3 or pixels.shape[0] != frames):
        raise ValueError(
            f"derived pixels for a {frames}-frame source must be (frames, rows, cols[, 3]), got shape {pixels.shape}"
        )
    if not _pixel_shape_ok(plane, colour):
        want = "(rows, cols) or (rows, cols, 3)" if colour else "2-D (rows, cols)"
        raise ValueError(f"derived pixels must be a {want} array per frame, got shape {pixels.shape}")


def write_derived_series(
    result: DerivedImages,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    series_number: int = 9005,
    series_instance_uid: str | None = None,
    keep_source_window: bool = False,
) -> list[Dataset]:
    """One derived instance per source instance that has pixels in ``result`` (source order kept).

    Single-frame sources: ``result.pixels[SOPInstanceUID]`` is (rows, cols) or (rows, cols, 3).
    Multi-frame sources (Enhanced/Legacy Converted CT/MR/PET with functional groups, US cine): one
    multi-frame derived instance per source with every frame, from ``pixels[SOPInstanceUID]``
    (frames, rows, cols[, 3]) or ``pixels[(SOPInstanceUID, frame number)]``; per-frame geometry
    is kept (and rescaled with the grid), each frame references its source frame. Multi-frame
    sources without per-frame geometry that need it are refused (UnsupportedSourceError).
    """
    check_same_study(sources)
    sources = writable_sources(sources)
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    unknown = [k for k in result.pixels if (str(k[0]) if isinstance(k, tuple) else k) not in by_uid]
    if unknown:
        raise SourceError(f"derived pixels refer to {len(unknown)} instance(s) that are not among the sources")
    if not result.pixels:
        raise ValueError("derived result holds no images")
    series_uid = series_instance_uid or new_uid(provenance.uid_root)
    now = datetime.now()
    code = Dataset()
    code.CodeValue = result.derivation_code.value
    code.CodingSchemeDesignator = result.derivation_code.scheme
    code.CodeMeaning = result.derivation_code.meaning
    out = []
    for src in sources:
        pixels = _frames_for(result, src)
        if pixels is None:
            continue
        photometric = str(src.get("PhotometricInterpretation", ""))
        colour = photometric in COLOUR_PHOTOMETRICS or int(src.get("SamplesPerPixel", 1) or 1) == 3
        if not colour and photometric not in _MONOCHROME:
            raise UnsupportedSourceError(
                f"derived series are written for monochrome or colour images; this source's "
                f"PhotometricInterpretation is {photometric or 'missing'}"
            )
        multi = is_multiframe(src)
        enhanced = multi and "PerFrameFunctionalGroupsSequence" in src
        frames = int(src.get("NumberOfFrames", 1) or 1) if multi else None
        if multi and not enhanced and "ImageOrientationPatient" in src:
            raise UnsupportedSourceError(
                f"this multi-frame {_sop_class_name(src)} has no per-frame functional groups, so the "
                "geometry of each derived frame cannot be stated"
            )
        _check_shape(pixels, colour, frames)
        ds = _header_copy(src)
        ds.SOPClassUID = current_sop_class(str(src.SOPClassUID))
        _fill_type2(ds, enhanced)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = new_uid(provenance.uid_root)
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description(result.series_description, provenance)
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
        image_type = [str(v) for v in src.get("ImageType", [])]
        if enhanced:
            # Enhanced IODs: Value 2 stays PRIMARY (C.8.16.1.1); frames say DERIVED in their Frame Type.
            ds.ImageType = ["DERIVED", *(image_type[1:] or ["PRIMARY"])]
        else:
            rest = image_type[2:]
            ds.ImageType = ["DERIVED", "SECONDARY", *rest]
        description = f"{result.derivation_description} by {provenance.model_name}"[:1024]
        if enhanced:
            _derive_frames(ds, src, code, description)
        else:
            ref = Dataset()
            ref.ReferencedSOPClassUID = src.SOPClassUID
            ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
            ref.PurposeOfReferenceCodeSequence = DicomSequence([_purpose_source_image()])
            ds.SourceImageSequence = DicomSequence([ref])
            ds.DerivationDescription = description
            ds.DerivationCodeSequence = DicomSequence([copy.deepcopy(code)])
        if result.synthetic:
            ds.SyntheticData = "YES"
        _lossy_history(ds, src)
        if "Laterality" not in ds and not enhanced:  # enhanced: Frame Anatomy holds laterality
            copy_body_part_and_laterality(ds, src)
        acq = _acquisition_equipment(src)
        ai = contributing_equipment(provenance, "synthesizing", result.derivation_description)
        ds.ContributingEquipmentSequence = DicomSequence([*([acq] if acq else []), ai])
        apply_provenance(ds, provenance)
        rows, cols = pixels.shape[1:3] if multi else pixels.shape[:2]
        if enhanced:
            _resample_frames(ds, rows, cols)
        elif "PixelSpacing" in ds and "ImagePositionPatient" in ds:
            _resample_geometry(ds, rows, cols)
        elif (rows, cols) != (int(src.Rows), int(src.Columns)):
            for kw in ("SequenceOfUltrasoundRegions", "PixelAspectRatio"):  # pixel-based, now wrong
                if kw in ds:
                    delattr(ds, kw)
        ds.Rows, ds.Columns = rows, cols
        values = pixels.astype(np.float64, copy=False)
        if colour:
            _store_rgb(ds, values, grey=values.ndim == (3 if multi else 2))
        else:
            ds.SamplesPerPixel = 1
            if int(src.get("BitsAllocated", 16) or 16) == 8:
                _store_8bit_monochrome(ds, src, values)
            elif enhanced:
                _store_16bit_enhanced(ds, values)
            else:
                _store_16bit_monochrome(ds, src, values, keep_source_window)
            _set_window(ds, src, pixels, keep_source_window, enhanced)
        out.append(finish(ds, provenance.uid_root))
    return out


def _set_window(ds: Dataset, src: Dataset, pixels: np.ndarray, keep: bool, enhanced: bool) -> None:
    if not enhanced:
        if keep and "WindowCenter" in src and "WindowWidth" in src:
            ds.WindowCenter, ds.WindowWidth = src.WindowCenter, src.WindowWidth
        else:
            ds.WindowCenter, ds.WindowWidth = _window(pixels)
        return
    center, width = _window(pixels)
    for group in _groups(ds):
        for item in group.get("FrameVOILUTSequence", []):
            if not keep:
                item.WindowCenter, item.WindowWidth = center, width
                for kw in ("WindowCenterWidthExplanation", "VOILUTFunction"):
                    if kw in item:
                        delattr(item, kw)


def _groups(ds: Dataset) -> list[Dataset]:
    """The shared functional group item and every per-frame item (PS3.3 C.7.6.16)."""
    return [*ds.get("SharedFunctionalGroupsSequence", []), *ds.get("PerFrameFunctionalGroupsSequence", [])]


_FRAME_TYPE_SEQUENCES = (
    "CTImageFrameTypeSequence",
    "MRImageFrameTypeSequence",
    "PETFrameTypeSequence",
    "XARFFrameCharacteristicsSequence",
)


def _derive_frames(ds: Dataset, src: Dataset, code: Dataset, description: str) -> None:
    """Frame Type DERIVED in every group, RWV mappings of the old values dropped, and a Derivation
    Image item per frame referencing its source frame (C.7.6.16.2.6)."""
    colour = int(src.get("SamplesPerPixel", 1) or 1) == 3
    if "PixelPresentation" in ds:  # the source's palette is dropped: ours is MONOCHROME (or TRUE_COLOR)
        ds.PixelPresentation = "TRUE_COLOR" if colour else "MONOCHROME"
    for group in _groups(ds):
        for kw in _FRAME_TYPE_SEQUENCES:
            for item in group.get(kw, []):
                frame_type = [str(v) for v in item.get("FrameType", [])] or ["DERIVED", "PRIMARY"]
                item.FrameType = ["DERIVED", *frame_type[1:]]
                if "PixelPresentation" in item:
                    item.PixelPresentation = ds.get("PixelPresentation", "MONOCHROME")
        if "RealWorldValueMappingSequence" in group:
            del group.RealWorldValueMappingSequence
    for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        ref.ReferencedFrameNumber = number
        ref.PurposeOfReferenceCodeSequence = DicomSequence([_purpose_source_image()])
        derivation = Dataset()
        derivation.DerivationDescription = description
        derivation.DerivationCodeSequence = DicomSequence([copy.deepcopy(code)])
        derivation.SourceImageSequence = DicomSequence([ref])
        item.DerivationImageSequence = DicomSequence([derivation])
    # Every instance the Derivation Image items reference, as a hierarchical reference (C.8.15.2).
    instance = Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = src.SeriesInstanceUID
    series.ReferencedSOPSequence = DicomSequence([instance])
    evidence = Dataset()
    evidence.StudyInstanceUID = src.StudyInstanceUID
    evidence.ReferencedSeriesSequence = DicomSequence([series])
    ds.SourceImageEvidenceSequence = DicomSequence([evidence])


def _resample_frames(ds: Dataset, rows: int, cols: int) -> None:
    """_resample_geometry for functional groups: Pixel Measures and each frame's Plane Position."""
    old_rows, old_cols = int(ds.Rows), int(ds.Columns)
    if (rows, cols) == (old_rows, old_cols):
        return
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    moved: set[int] = set()  # a position shared by all frames is moved once
    for i, per in enumerate(ds.PerFrameFunctionalGroupsSequence):

        def find(kw: str, per: Dataset = per, i: int = i) -> Dataset:
            for group in (per, shared):
                if kw in group and len(group[kw].value):
                    return group[kw][0]
            raise UnsupportedSourceError(f"frame {i + 1} of the multi-frame source lacks {kw}")

        plane = Dataset()
        plane.Rows, plane.Columns = old_rows, old_cols
        plane.PixelSpacing = find("PixelMeasuresSequence").PixelSpacing
        plane.ImageOrientationPatient = find("PlaneOrientationSequence").ImageOrientationPatient
        plane.ImagePositionPatient = find("PlanePositionSequence").ImagePositionPatient
        _resample_geometry(plane, rows, cols)
        position = find("PlanePositionSequence")
        if id(position) not in moved:
            position.ImagePositionPatient = plane.ImagePositionPatient
            moved.add(id(position))
        new_spacing = plane.PixelSpacing
    for group in _groups(ds):
        for item in group.get("PixelMeasuresSequence", []):
            item.PixelSpacing = new_spacing


def _store_16bit_enhanced(ds: Dataset, values: np.ndarray) -> None:
    """Modality values stored as they are: Pixel Value Transformation 1/0 in every group."""
    data, signed = _encode(values)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, signed
    for group in _groups(ds):
        for item in group.get("PixelValueTransformationSequence", []):
            item.RescaleIntercept, item.RescaleSlope = 0, 1
    ds.PixelData = data


def _sop_class_name(ds: Dataset) -> str:
    return UID(str(ds.get("SOPClassUID", ""))).name or "image"


def _purpose_source_image() -> Dataset:
    code = codes.DCM.SourceImageForImageProcessingOperation
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item
