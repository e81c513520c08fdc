"""Synthetic studies: the one source of made-up DICOM data for the demo, the tests and the benchmarks.

- `make_ct_series(dir, n)` / `make_cr(dir)`: files of a chest CT series and a PA chest CR with a
  phantom (body, lungs, spine, a lesion), full geometry, passing `dciodvfy -new` without Error
  lines (tests/bench checks it); what `unimedvl demo` and the benchmarks send.
- `ct_series(n, order=..., oblique_deg=..., gaps=...)`: an in-memory CT series with the geometry
  real archives deliver (any slice order, descending positions, oblique planes, missing slices),
  UTF-8 names; for the writers' geometry tests.
- `ct_instance(...)`: one tiny CT dataset with given UIDs and identity, for protocol tests.

Nothing here is PHI. UIDs are pydicom's `generate_uid` under 2.25 (a random UUID). Bad
arguments (no slices, an unknown slice order) raise ValueError.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def new_uid() -> str:
    """A UID under the 2.25 root derived from a random UUID (no registered root needed)."""
    return generate_uid(prefix=None)


_uid = new_uid


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "UNIMEDVL_BENCH"
    return meta


def _grayscale_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int, *, signed: bool = False) -> None:
    """Image Pixel module for a 16-bit MONOCHROME2 frame (rows x cols array of stored values)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()


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
        _grayscale_pixels(ds, stored, 16, signed=True)
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = [40, -600]
        ds.WindowWidth = [400, 1500]
        ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
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
    _grayscale_pixels(ds, pixels, 12)
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    path = out / "cr_00001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------- in memory


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
    study_uid, series_uid, for_uid = _uid(), _uid(), _uid()
    rot = _rotation(oblique_deg) if oblique_deg else np.eye(3)
    row_dir, col_dir = rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 1.0, 0])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-columns * pixel_spacing[1] / 2, -rows * pixel_spacing[0] / 2, -40.0])
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    yy, xx = np.mgrid[0:rows, 0:columns]
    out = []
    kept = [k for k in range(n_slices + len(gaps)) if k not in gaps]
    for inst, k in enumerate(kept, start=1):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = _uid()
        ds.file_meta = _file_meta(CTImageStorage, ds.SOPInstanceUID)
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
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        r = np.hypot(yy - rows / 2, xx - columns / 2)
        hu = np.where(r < rows * 0.4, 40 + 10 * np.sin(k + xx / 5.0), -1000).astype(np.int32)
        _grayscale_pixels(ds, (hu + 1024).clip(0, 4095), 12)
        out.append(ds)
    if order == "descending":
        out.reverse()
    elif order == "random":
        rng.shuffle(out)
    elif order != "ascending":
        raise ValueError(f"order must be ascending, descending or random, not {order!r}")
    return out


def ct_instance(
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    patient_id: str = "PAT-1",
    instance_number: int = 1,
    size: int = 8,
    fill: int = 0,
) -> Dataset:
    """One small CT Image Storage dataset in memory (size x size, 16 bit, file meta, no geometry).

    For protocol tests that need many distinct instances fast: pixels are `fill + instance_number`,
    identity and UIDs as given (new ones otherwise).
    """
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or _uid()
    ds.StudyInstanceUID = study_uid or _uid()
    ds.SeriesInstanceUID = series_uid or _uid()
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.AccessionNumber = "ACC1"
    ds.StudyDate = "20250101"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "axial"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    _grayscale_pixels(ds, np.full((size, size), fill, dtype=np.uint16) + instance_number, 16)
    ds.file_meta = _file_meta(CTImageStorage, ds.SOPInstanceUID)
    return ds


def write_large_ct(path: Path, rows: int, columns: int, **identity: str) -> int:
    """A single-frame 16-bit CT Part 10 file of rows x columns pixels, built on disk without the
    pixels in memory: the header is written by pydicom, then the Pixel Data element header
    (explicit VR LE, OW, PS3.5 7.1.2) and a zero-filled value appended by extending the file
    (sparse where the filesystem allows). Returns the file size in bytes. For large-instance
    tests and benchmarks (`max_instance_bytes`, bounded memory while receiving)."""
    length = rows * columns * 2
    if length > 0xFFFFFFFE:
        raise ValueError("Pixel Data longer than a 32-bit length allows")
    ds = ct_instance(**identity)
    del ds.PixelData
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(path, enforce_file_format=True)
    with open(path, "r+b") as fh:
        fh.seek(0, 2)
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        fh.truncate(fh.tell() + length)
        return fh.tell() + length
