"""Small result objects of each kind the exporter delivers: CT slice, Basic Text SR, SEG, SC.

Built directly with pydicom/highdicom so the delivery tests do not depend on sr_writers.
"""

from __future__ import annotations

import datetime as dt
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.synthetic import make_ct_series
from sr_writers.common import copy_identity

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def ct_slices(out_dir: Path, n: int = 2, *, seed: int = 1) -> list[Dataset]:
    return [dcmread(p) for p in make_ct_series(out_dir, n, rows=64, cols=64, seed=seed)]


def _segment(number: int = 1, label: str = "lesion") -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="UniMedVL test", family=codes.cid7162.ArtificialIntelligence, version="0"
        ),
    )


def _mask(ct: list[Dataset]) -> np.ndarray:
    mask = np.zeros((len(ct), ct[0].Rows, ct[0].Columns), dtype=np.uint8)
    mask[:, 20:40, 24:44] = 1
    return mask


def seg(ct: list[Dataset], *, labelmap: bool = False) -> Dataset:
    return hd.seg.Segmentation(
        source_images=ct,
        pixel_array=_mask(ct),
        segmentation_type="LABELMAP" if labelmap else "BINARY",
        segment_descriptions=[_segment()],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="UniMedVL",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
        omit_empty_frames=False,
    )


def labelmap_to_binary_converter(ct: list[Dataset]):
    """A LABELMAP->BINARY re-renderer for the fallback hook: decode the stored bytes, re-encode as BINARY."""

    def convert(data: bytes) -> bytes | None:
        lm = hd.seg.segread(BytesIO(data))
        uids = [str(d.SOPInstanceUID) for d in ct]
        labels = lm.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
        binary = hd.seg.Segmentation(
            source_images=ct,
            pixel_array=(labels == 1).astype(np.uint8),
            segmentation_type="BINARY",
            segment_descriptions=[_segment()],
            series_instance_uid=str(lm.SeriesInstanceUID),
            series_number=int(lm.SeriesNumber),
            sop_instance_uid=generate_uid(),
            instance_number=int(lm.InstanceNumber),
            manufacturer="UniMedVL",
            manufacturer_model_name="test",
            software_versions="0",
            device_serial_number="0",
            omit_empty_frames=False,
        )
        buf = BytesIO()
        binary.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    return convert


def secondary_capture(ct: Dataset) -> Dataset:
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[8:24, 8:24] = 200
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ct,
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=902,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="UniMedVL",
        patient_orientation=("L", "P"),
    )
    return sc


def basic_text_sr(ct: Dataset, text: str = "No acute findings.") -> Dataset:
    now = dt.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy_identity(ds, ct)  # patient and study of the source, so it files under the same study
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 903
    ds.InstanceNumber = 1
    ds.Manufacturer = "UniMedVL"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = [title]
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = [name]
    item.TextValue = text
    ds.ContentSequence = [item]
    return ds
