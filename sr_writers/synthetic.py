"""Synthetic CT series with full patient geometry, for demos, tests and benchmarks.

Pixels are a smooth phantom in HU; geometry options reproduce what real archives deliver:
slices in any order, descending positions, oblique planes, missing slices (gaps).
"""

from __future__ import annotations

import random
from datetime import datetime

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from .uids import new_uid


def _rotation(angle_deg: float) -> np.ndarray:
    """Oblique orientation: rotate the axial plane about the patient x axis, then about z."""
    a = np.deg2rad(angle_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(a / 2), -np.sin(a / 2), 0], [np.sin(a / 2), np.cos(a / 2), 0], [0, 0, 1]])
    return rz @ rx


def ct_series(
    n_slices: int = 8,
    rows: int = 32,
    columns: int = 32,
    *,
    order: str = "ascending",
    oblique_deg: float = 0.0,
    gaps: tuple[int, ...] = (),
    spacing: float = 2.5,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    patient_name: str = "Müller^Jürgen",
    seed: int = 0,
) -> list[Dataset]:
    """``n_slices`` CT slices of one series; ``gaps`` lists slice indices left out of the volume.

    order: 'ascending' (z grows with InstanceNumber), 'descending', or 'random' (shuffled list).
    """
    rng = random.Random(seed)
    study_uid, series_uid, for_uid = new_uid(), new_uid(), new_uid()
    rot = _rotation(oblique_deg) if oblique_deg else np.eye(3)
    row_dir, col_dir = rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 1.0, 0])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-columns * pixel_spacing[1] / 2, -rows * pixel_spacing[0] / 2, -40.0])
    now = datetime(2026, 1, 2, 3, 4, 5)
    yy, xx = np.mgrid[0:rows, 0:columns]
    out = []
    kept = [k for k in range(n_slices + len(gaps)) if k not in gaps]
    for inst, k in enumerate(kept, start=1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = new_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, "SYN-0001", "19600101", "M"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC0001", ""
        ds.StudyDescription = "CT Thorax (synthetisch)"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, inst
        ds.SeriesDescription = "Thorax 2.5mm"
        ds.BodyPartExamined = "CHEST"
        ds.Manufacturer, ds.PositionReferenceIndicator = "SyntheticCT", ""
        ds.PatientPosition = "HFS"
        ds.AcquisitionNumber, ds.KVP = 1, 120
        pos = origin + normal * (k * spacing)
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = round(float(np.dot(pos, normal)), 4)
        ds.SliceThickness, ds.PixelSpacing = spacing, list(pixel_spacing)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        r = np.hypot(yy - rows / 2, xx - columns / 2)
        hu = np.where(r < rows * 0.4, 40 + 10 * np.sin(k + xx / 5.0), -1000).astype(np.int32)
        ds.PixelData = (hu + 1024).clip(0, 4095).astype(np.uint16).tobytes()
        out.append(ds)
    if order == "descending":
        out.reverse()
    elif order == "random":
        rng.shuffle(out)
    elif order != "ascending":
        raise ValueError(f"order must be ascending, descending or random, not {order!r}")
    return out
