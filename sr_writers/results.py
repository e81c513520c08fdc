"""Typed model results handed to the writers.

These carry only what the model produced plus the facts needed to describe it (provenance,
codes); the DICOM context (patient, study, geometry) always comes from the source datasets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .uids import DEFAULT_UID_ROOT


@dataclass(frozen=True)
class Code:
    """A coded concept: (code value, coding scheme designator, code meaning <= 64 chars)."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        if not self.value or not self.scheme or not self.meaning:
            raise ValueError(f"code needs value, scheme and meaning: {self!r}")
        if len(self.meaning) > 64:
            raise ValueError(f"code meaning longer than 64 characters: {self.meaning!r}")


# Defaults for AI segment descriptions (CID 7150 category / CID 7151 type); configurable per segment.
TISSUE_CATEGORY = Code("85756007", "SCT", "Tissue")
ABNORMAL_CATEGORY = Code("49755003", "SCT", "Morphologically Altered Structure")
LESION_TYPE = Code("52988006", "SCT", "Lesion")
ORGAN_TYPE = Code("113343008", "SCT", "Organ")


@dataclass(frozen=True)
class Provenance:
    """Who made a result: written as General Equipment, Contributing Equipment, SR device observer."""

    model_name: str = "UniMedVL"
    model_version: str = "unknown"
    checkpoint_hash: str = ""
    manufacturer: str = "UniMedVL project"
    is_demo: bool = False
    software_versions: tuple[str, ...] = ()
    device_serial_number: str | None = None
    institution_name: str | None = None
    uid_root: str = DEFAULT_UID_ROOT
    # Stable device UID of the AI "device" observer; derived from model + checkpoint when empty.
    device_uid: str | None = None

    @property
    def serial_number(self) -> str:
        """DeviceSerialNumber: explicit value, else the first 16 hex digits of the checkpoint hash."""
        if self.device_serial_number:
            return self.device_serial_number
        if self.is_demo:
            return "demo-" + (self.checkpoint_hash[:11] or "tiny")
        return self.checkpoint_hash[:16] or "unknown"

    @property
    def model_label(self) -> str:
        """ManufacturerModelName (LO, 64 chars)."""
        label = self.model_name + (" (demo weights)" if self.is_demo else "")
        return label[:64]

    @property
    def versions(self) -> list[str]:
        """SoftwareVersions values: model version, checkpoint hash, then any extra versions."""
        out = [f"{self.model_name} {self.model_version}"[:63]]
        if self.checkpoint_hash:
            out.append(f"checkpoint sha256:{self.checkpoint_hash[:45]}")  # LO 64 incl. the pad byte
        out.extend(v[:63] for v in self.software_versions)
        return out


@dataclass(frozen=True)
class ReportResult:
    """Generated report text and visual question answering pairs.

    ``sources`` are the instances the model looked at; every one is referenced as evidence.
    """

    findings: str = ""
    impression: str = ""
    qa: Sequence[tuple[str, str]] = ()
    title: str = "AI draft report"

    def __post_init__(self) -> None:
        if not (self.findings.strip() or self.impression.strip() or self.qa):
            raise ValueError("report result is empty: no findings, impression or question/answer pairs")
        for pair in self.qa:
            if len(pair) != 2 or not str(pair[0]).strip():
                raise ValueError(f"question/answer pair must be (question, answer) with a question: {pair!r}")


@dataclass(frozen=True)
class Segment:
    """One segment's description (SEG Segment Sequence item and SR tracking identity)."""

    label: str
    category: Code = ABNORMAL_CATEGORY
    property_type: Code = LESION_TYPE
    algorithm_name: str = "UniMedVL segmentation"
    algorithm_version: str = "unknown"
    tracking_id: str | None = None
    tracking_uid: str | None = None
    display_color_rgb: tuple[int, int, int] | None = None


# A source frame: an instance's SOPInstanceUID (single-frame image), or (SOPInstanceUID, frame number)
# for a frame of a multi-frame image (frame numbers start at 1).
SourceFrameKey = str | tuple[str, int]


@dataclass
class SegmentationResult:
    """Per-source-frame masks on the source pixel grid.

    ``masks[key]`` is a bool array of shape (rows, cols) when there is one segment, or
    (n_segments, rows, cols). Source frames without an entry are empty (the model did not
    look at them, or found nothing).
    """

    segments: Sequence[Segment]
    masks: Mapping[SourceFrameKey, np.ndarray]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("segmentation result has no segments")
        labels = [s.label for s in self.segments]
        if len(set(labels)) != len(labels):
            raise ValueError(f"segment labels must be unique: {labels}")

    def mask_for(self, key: SourceFrameKey, rows: int, cols: int) -> np.ndarray:
        """(n_segments, rows, cols) bool for one source frame; zeros when absent."""
        n = len(self.segments)
        arr = self.masks.get(key)
        if arr is None:
            return np.zeros((n, rows, cols), dtype=bool)
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = arr[np.newaxis]
        if arr.shape != (n, rows, cols):
            raise ValueError(
                f"mask for source frame {_key_text(key)} has shape {arr.shape}, expected {(n, rows, cols)} "
                f"(segments, rows, cols) on the source grid"
            )
        return arr.astype(bool, copy=False)


@dataclass(frozen=True)
class SynthesizedImage:
    """A generated 2-D image (text-to-image): uint8 (rows, cols) monochrome or (rows, cols, 3) RGB."""

    pixels: np.ndarray
    description: str = "AI synthesized image"
    prompt: str | None = None


@dataclass
class DerivedImages:
    """Image-to-image results on a volume: one new pixel array per source instance.

    Values are in the source's modality units (e.g. HU for CT); arrays may have a different
    size than the source (super-resolution), the field of view stays the same.
    """

    pixels: Mapping[str, np.ndarray]
    derivation_description: str
    # CID 7203 derivation code; 113085 "Spatial resampling" suits super-resolution.
    derivation_code: Code = field(default_factory=lambda: Code("113085", "DCM", "Spatial resampling"))
    synthetic: bool = True
    series_description: str = "AI derived images"


def _key_text(key: SourceFrameKey) -> str:
    return f"{key[0]} frame {key[1]}" if isinstance(key, tuple) else str(key)
