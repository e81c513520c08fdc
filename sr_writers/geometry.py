"""Source geometry: which frames a result refers to, in what spatial order.

A segmentation or measurement refers to *source frames*: each instance of a classic
single-frame series, or each frame of one multi-frame (Enhanced CT/MR, Legacy Converted)
image. Slices may arrive in any order, descend, be oblique or have gaps; we order them along
the slice normal so frame k of every object we write is the k-th slice in space, and every
frame still carries its own source reference and position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset

from .common import SourceError, check_same_study
from .errors import NoFrameOfReferenceError, NoPatientGeometryError
from .results import SourceFrameKey

_ORIENTATION_TOL = 1e-3
_POSITION_TOL = 1e-3  # mm


@dataclass(frozen=True)
class SourceFrame:
    key: SourceFrameKey  # SOPInstanceUID, or (SOPInstanceUID, frame number) for multi-frame sources
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # None for single-frame instances
    position: np.ndarray  # ImagePositionPatient (mm)
    orientation: np.ndarray  # ImageOrientationPatient (6 values)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slice_thickness: float | None


@dataclass(frozen=True)
class SourceGeometry:
    """Source frames sorted along the slice normal, plus what all of them share."""

    frames: list[SourceFrame]
    datasets: list[Dataset]  # datasets in the order highdicom expects (sorted single-frames, or [multi-frame])
    multiframe: bool
    rows: int
    columns: int
    frame_of_reference_uid: str
    series_instance_uid: str

    def index_of(self, key: SourceFrameKey) -> int:
        for i, f in enumerate(self.frames):
            if f.key == key:
                return i
        raise SourceError(f"mask refers to a source frame that is not among the sources: {key!r}")

    @property
    def slice_spacing(self) -> float | None:
        """Median distance between consecutive slice centres along the normal (None for one slice)."""
        if len(self.frames) < 2:
            return None
        normal = _normal(self.frames[0].orientation)
        d = np.diff([float(np.dot(f.position, normal)) for f in self.frames])
        return float(np.median(np.abs(d)))


def _normal(iop: np.ndarray) -> np.ndarray:
    """Unit slice normal, row direction x column direction (highdicom's, PS3.3 C.7.6.2.1.1)."""
    return hd.spatial.get_normal_vector(iop)


def _floats(value, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise SourceError(f"source {what} is not numeric") from exc
    if arr.shape != (n,):
        raise SourceError(f"source {what} must have {n} values, has {arr.size}")
    return arr


def _frame_groups(ds: Dataset, i: int):
    per = ds.PerFrameFunctionalGroupsSequence[i] if "PerFrameFunctionalGroupsSequence" in ds else Dataset()
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()

    def find(seq_kw: str):
        for group in (per, shared):
            if seq_kw in group and len(group[seq_kw].value):
                return group[seq_kw][0]
        raise SourceError(f"multi-frame source frame {i + 1} lacks {seq_kw}")

    return find


def _multiframe_frames(ds: Dataset) -> list[SourceFrame]:
    frames = []
    for i in range(int(ds.NumberOfFrames)):
        find = _frame_groups(ds, i)
        pos = _floats(find("PlanePositionSequence").ImagePositionPatient, 3, "ImagePositionPatient")
        iop = _floats(find("PlaneOrientationSequence").ImageOrientationPatient, 6, "ImageOrientationPatient")
        measures = find("PixelMeasuresSequence")
        spacing = _floats(measures.PixelSpacing, 2, "PixelSpacing")
        thickness = float(measures.SliceThickness) if measures.get("SliceThickness") not in (None, "") else None
        frames.append(
            SourceFrame(
                key=(str(ds.SOPInstanceUID), i + 1),
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                frame_number=i + 1,
                position=pos,
                orientation=iop,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                slice_thickness=thickness,
            )
        )
    return frames


def _single_frame(ds: Dataset) -> SourceFrame:
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if kw not in ds:
            raise NoPatientGeometryError(f"the source image has no {kw}, so a mask cannot be placed in patient space")
    thickness = ds.get("SliceThickness")
    return SourceFrame(
        key=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        frame_number=None,
        position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
        orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
        pixel_spacing=tuple(float(v) for v in _floats(ds.PixelSpacing, 2, "PixelSpacing")),  # type: ignore[arg-type]
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
    )


def is_multiframe(ds: Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def source_geometry(sources: Sequence[Dataset]) -> SourceGeometry:
    """Validate the sources (one series, one FoR, one grid and orientation) and order them in space.

    Raises NoFrameOfReferenceError when the source has no FrameOfReferenceUID (PS3.3 C.7.4.1; e.g.
    CR, US, secondary captures), NoPatientGeometryError when it lacks the Image Plane attributes,
    SourceError for the other reasons above; each message is one sentence without patient data.
    """
    check_same_study(sources)
    sources = list(sources)
    fors = {str(s.get("FrameOfReferenceUID", "") or "") for s in sources}
    if "" in fors:
        which = "the source series has" if len(fors) == 1 else "some source images have"
        raise NoFrameOfReferenceError(
            f"{which} no Frame of Reference UID (FrameOfReferenceUID), so a segmentation or measurement "
            "cannot be placed in patient space"
        )
    if any(is_multiframe(s) for s in sources):
        if len(sources) != 1:
            raise SourceError("a multi-frame source must be the only source of a segmentation")
        frames = _multiframe_frames(sources[0])
        datasets = sources
    else:
        frames = [_single_frame(s) for s in sources]
        datasets = sources
    if len({str(s.SeriesInstanceUID) for s in sources}) != 1:
        raise SourceError("source instances come from more than one series")
    if len(fors) != 1:
        raise SourceError(f"the source images have {len(fors)} different FrameOfReferenceUID values, not one")
    if len({(int(s.Rows), int(s.Columns)) for s in sources}) != 1:
        raise SourceError("source instances have different Rows/Columns")
    iop0 = frames[0].orientation
    if any(np.max(np.abs(f.orientation - iop0)) > _ORIENTATION_TOL for f in frames):
        raise SourceError("source frames have different ImageOrientationPatient (not one stack)")
    normal = _normal(iop0)
    order = sorted(range(len(frames)), key=lambda i: float(np.dot(frames[i].position, normal)))
    frames = [frames[i] for i in order]
    if len(sources) > 1:
        datasets = [sources[i] for i in order]
    proj = [float(np.dot(f.position, normal)) for f in frames]
    if any(abs(b - a) < _POSITION_TOL for a, b in zip(proj, proj[1:], strict=False)):
        raise SourceError("two source frames share one slice position (duplicates or a time series)")
    return SourceGeometry(
        frames=frames,
        datasets=datasets,
        multiframe=is_multiframe(sources[0]),
        rows=int(sources[0].Rows),
        columns=int(sources[0].Columns),
        frame_of_reference_uid=str(sources[0].FrameOfReferenceUID),
        series_instance_uid=str(sources[0].SeriesInstanceUID),
    )


def fill_slice_thickness(geom: SourceGeometry) -> None:
    """Give single-frame sources without a SliceThickness value (Type 2, PS3.3 C.7.6.2) the spacing
    between slice centres, so highdicom's Pixel Measures and image library descriptors have one;
    a single such image raises NoPatientGeometryError (its thickness cannot be derived). Only for
    writers' own copies (``source_prep``): changes ``geom.datasets`` in place."""
    if geom.multiframe:
        return
    for ds in geom.datasets:
        if ds.get("SliceThickness") in (None, ""):
            spacing = geom.slice_spacing
            if not spacing:
                raise NoPatientGeometryError(
                    "the source is a single image without a SliceThickness value, so the thickness of "
                    "a segmentation on it (Pixel Measures, PS3.3 C.7.6.16.2.1) is unknown"
                )
            ds.SliceThickness = round(spacing, 6)
