"""Synthetic but standard-conformant DICOM test objects: a CT series and a CR chest.

The pixel data is a phantom (body, lungs, spine, a lesion) so model and preprocessing tests
have structure to look at. The headers carry full geometry, so writers that must keep the
source geometry (SEG, derived series) have something real to keep. Nothing here is PHI.

Objects pass `dciodvfy -new` without Error lines (tests/bench checks it).
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def new_uid() -> str:
    """A UID under the 2.25 root derived from a random UUID (no registered root needed)."""
    return f"2.25.{uuid.uuid4().int}"


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "UNIMEDVL_BENCH"
    return meta


def _patient_study(ds: Dataset, *, patient_id: str, study_uid: str, now: dt.datetime) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "BENCH^PHANTOM"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic phantom"
    ds.Manufacturer = "UniMedVL synthetic"
    ds.ManufacturerModelName = "phantom"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "Synthetic"


# --------------------------------------------------------------------------------------------- CT


def _ct_phantom_hu(
    n_slices: int, rows: int, cols: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Noise-free HU of a trunk phantom per slice plus a per-slice noise field (views, cheap)."""
    # Normalised in-plane coordinates in [-1, 1]; the volume is generated slice by slice by the caller.
    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j].astype(np.float32)
    body = (x / 0.85) ** 2 + (y / 0.62) ** 2 <= 1.0
    lung_l = ((x + 0.38) / 0.27) ** 2 + ((y + 0.05) / 0.4) ** 2 <= 1.0
    lung_r = ((x - 0.38) / 0.27) ** 2 + ((y + 0.05) / 0.4) ** 2 <= 1.0
    spine = (x / 0.09) ** 2 + ((y - 0.45) / 0.09) ** 2 <= 1.0
    base = np.full((rows, cols), -1000.0, dtype=np.float32)
    base[body] = 40.0  # soft tissue
    base[body & (lung_l | lung_r)] = -820.0
    base[spine] = 700.0  # bone
    # One noise field, rolled differently per slice: realistic texture at a fraction of the cost.
    noise = rng.normal(0.0, 12.0, size=(rows, cols)).astype(np.float32)
    shifts = [noise if i == 0 else np.roll(noise, (7 * i) % rows, axis=(i % 2)) for i in range(min(n_slices, 64))]
    return base, shifts


def make_ct_series(
    out_dir: Path | str,
    n_slices: int,
    rows: int = 512,
    cols: int = 512,
    *,
    seed: int = 0,
    study_uid: str | None = None,
    patient_id: str = "BENCH^001",
    slice_thickness: float = 1.25,
    pixel_spacing: float = 0.7,
) -> list[Path]:
    """Write `n_slices` CT Image Storage files (16-bit signed, Explicit VR LE) into `out_dir`.

    Geometry: axial, ImageOrientationPatient 1\\0\\0\\0\\1\\0, ImagePositionPatient stepping
    by `slice_thickness` in z, one FrameOfReferenceUID. A spherical lesion (+60 HU) sits in
    the right lung around the middle third of the series. Returns the paths in slice order.
    """
    if n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    now = dt.datetime.now()
    study_uid = study_uid or new_uid()
    series_uid, for_uid = new_uid(), new_uid()
    base, noises = _ct_phantom_hu(n_slices, rows, cols, rng)

    # Lesion: sphere of radius ~ 6 % of the field of view, centred in the right lung.
    y, x = np.ogrid[:rows, :cols]
    cy, cx = rows * 0.47, cols * 0.69
    radius_px = 0.06 * cols
    centre_z = n_slices / 2.0
    radius_slices = max(1.0, radius_px * pixel_spacing / slice_thickness)
    d2 = ((y - cy) ** 2 + (x - cx) ** 2).astype(np.float32)

    fov_x = cols * pixel_spacing
    fov_y = rows * pixel_spacing
    paths: list[Path] = []
    for i in range(n_slices):
        hu = base + noises[i % len(noises)]
        dz = (i + 0.5 - centre_z) / radius_slices
        if abs(dz) < 1.0:
            r2 = (radius_px**2) * (1.0 - dz * dz)
            hu = np.where(d2 <= r2, 60.0 + noises[i % len(noises)], hu)
        stored = np.clip(np.rint(hu + 1024.0), -2048, 4095).astype("<i2")

        sop_uid = new_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_uid)
        _patient_study(ds, patient_id=patient_id, study_uid=study_uid, now=now)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = ds.StudyDate
        ds.InstanceCreationTime = ds.StudyTime
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDate = ds.StudyDate
        ds.SeriesTime = ds.StudyTime
        ds.SeriesDescription = "Synthetic chest CT"
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = -i * slice_thickness
        ds.ImagePositionPatient = [-fov_x / 2.0, -fov_y / 2.0, z]
        ds.SliceLocation = z
        ds.SliceThickness = slice_thickness
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = [40, -600]
        ds.WindowWidth = [400, 1500]
        ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
        ds.PixelData = stored.tobytes()
        path = out / f"ct_{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- CR


def make_cr(
    out_dir: Path | str,
    rows: int = 1024,
    cols: int = 1024,
    *,
    seed: int = 0,
    study_uid: str | None = None,
    patient_id: str = "BENCH^002",
    pixel_spacing: float = 0.35,
) -> Path:
    """Write one Computed Radiography PA chest phantom (MONOCHROME2, 12 bits in 16) and return its path.

    Lungs are dark, mediastinum/spine and ribs bright, with one bright nodule in the right lung.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    now = dt.datetime.now()
    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j].astype(np.float32)
    img = np.full((rows, cols), 300.0, dtype=np.float32)  # direct exposure outside the body: dark
    body = (x / 0.9) ** 2 + (y / 1.1) ** 2 <= 1.0
    img[body] = 2200.0
    lungs = (((x + 0.4) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2 <= 1.0) | (
        ((x - 0.4) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2 <= 1.0
    )
    img[lungs] = 900.0
    # Ribs: bright horizontal bands across the lung fields.
    ribs = lungs & (np.abs(np.sin((y + 0.05) * 9.0 * np.pi)) > 0.93)
    img[ribs] += 600.0
    img[np.abs(x) < 0.08] = 3000.0  # spine / mediastinum
    nodule = ((x - 0.45) ** 2 + (y + 0.2) ** 2) <= 0.05**2
    img[nodule] = 1900.0
    img += rng.normal(0.0, 25.0, size=img.shape).astype(np.float32)
    pixels = np.clip(np.rint(img), 0, 4095).astype("<u2")

    sop_uid = new_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(CR_IMAGE_STORAGE, sop_uid)
    _patient_study(ds, patient_id=patient_id, study_uid=study_uid or new_uid(), now=now)
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = ds.StudyDate
    ds.InstanceCreationTime = ds.StudyTime
    ds.Modality = "CR"
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Synthetic chest PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = pixels.tobytes()
    path = out / "cr_00001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
