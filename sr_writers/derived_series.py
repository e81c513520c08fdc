"""Derived series in the source SOP class for image-to-image results on a volume.

Each output instance is its source's header with the model's pixels: same SOP class, study,
Frame of Reference and patient geometry (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, SliceThickness), so MPR, linking and hanging protocols keep working. It gets a new
series and SOP instance UIDs, ImageType DERIVED\\SECONDARY, SourceImageSequence + derivation
description/code, SyntheticData, the AI model as General Equipment and the scanner plus the model
in ContributingEquipmentSequence. Private tags and everything that described the old pixels
(window, LUTs, padding, smallest/largest values, icons, overlays) are dropped; pixels are stored
uncompressed, 16 bit, with Rescale 1/0 where the IOD has a Modality LUT.

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
from pydicom.uid import ExplicitVRLittleEndian

from .common import (
    SourceError,
    apply_provenance,
    check_same_study,
    contributing_equipment,
    copy_body_part_and_laterality,
    finish,
    series_description,
)
from .geometry import is_multiframe
from .results import DerivedImages, Provenance
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


def write_derived_series(
    result: DerivedImages,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    series_number: int = 9005,
    series_instance_uid: str | None = None,
    keep_source_window: bool = False,
) -> list[Dataset]:
    """One derived instance per source instance that has pixels in ``result`` (source order kept)."""
    check_same_study(sources)
    if any(is_multiframe(s) for s in sources):
        raise SourceError("derived series are written for single-frame sources only (got a multi-frame image)")
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    unknown = [k for k in result.pixels if k not in by_uid]
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
        uid = str(src.SOPInstanceUID)
        if uid not in result.pixels:
            continue
        if str(src.get("PhotometricInterpretation", "")) not in ("MONOCHROME1", "MONOCHROME2"):
            raise SourceError("derived series are written for monochrome sources only")
        pixels = np.asarray(result.pixels[uid])
        if pixels.ndim != 2 or min(pixels.shape) < 1:
            raise ValueError(f"derived pixels must be a 2-D (rows, cols) array, got shape {pixels.shape}")
        ds = _header_copy(src)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = new_uid(provenance.uid_root)
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description(result.series_description, provenance)
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
        image_type = [str(v) for v in src.get("ImageType", [])]
        ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]] if len(image_type) > 2 else ["DERIVED", "SECONDARY"]
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        ref.PurposeOfReferenceCodeSequence = DicomSequence([_purpose_source_image()])
        ds.SourceImageSequence = DicomSequence([ref])
        ds.DerivationDescription = f"{result.derivation_description} by {provenance.model_name}"[:1024]
        ds.DerivationCodeSequence = DicomSequence([code])
        if result.synthetic:
            ds.SyntheticData = "YES"
        _lossy_history(ds, src)
        if "Laterality" not in ds:
            copy_body_part_and_laterality(ds, src)
        acq = _acquisition_equipment(src)
        ai = contributing_equipment(provenance, "synthesizing", result.derivation_description)
        ds.ContributingEquipmentSequence = DicomSequence([*([acq] if acq else []), ai])
        apply_provenance(ds, provenance)
        rows, cols = pixels.shape
        _resample_geometry(ds, rows, cols)
        data, signed = _encode(pixels.astype(np.float64, copy=False))
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, signed
        if str(src.SOPClassUID) in _RESCALE_SOP_CLASSES or "RescaleSlope" in src:
            ds.RescaleIntercept, ds.RescaleSlope = 0, 1
            if "RescaleType" in src:
                ds.RescaleType = src.RescaleType
            elif str(src.SOPClassUID) != CT_IMAGE_STORAGE:
                # The Modality LUT module needs RescaleType with a rescale (CT implies HU): unspecified.
                ds.RescaleType = "US"
        if keep_source_window and "WindowCenter" in src and "WindowWidth" in src:
            ds.WindowCenter, ds.WindowWidth = src.WindowCenter, src.WindowWidth
        else:
            ds.WindowCenter, ds.WindowWidth = _window(pixels)
        ds.PixelData = data
        out.append(finish(ds, provenance.uid_root))
    return out


def _purpose_source_image() -> Dataset:
    code = codes.DCM.SourceImageForImageProcessingOperation
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item
