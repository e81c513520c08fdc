"""DICOM pixels -> model images, and model outputs -> the source pixel grid.

The engine takes plain uint8 RGB images; everything DICOM-specific (compressed transfer
syntaxes, rescale, VOI windowing, MONOCHROME1, YBR, multi-frame, slice order and selection)
is resolved here so `inference.engine` never sees a Dataset.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

# Window presets (center, width) in Hounsfield units; the usual radiology defaults.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (32.0, 8.0),
    "liver": (60.0, 160.0),
    "abdomen": (60.0, 400.0),
}
# Modality default when neither the rule nor the dataset names a window.
MODALITY_DEFAULT_PRESET = {"CT": "soft_tissue"}

# VOI LUT Functions of PS3.3 C.11.2.1.3 (pydicom applies each).
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")

# Frames go to the engine at their own size: the engine resizes once, from the original, as the reference
# does (transforms.py:87); shrinking here first would resample twice. Only frames over the engine's input
# limit (20 megapixels, data_utils.py:121) are shrunk here, to just under it.
DEFAULT_MAX_SIDE: int | None = None
MAX_ENGINE_PIXELS = 20_000_000


class PreprocessError(ValueError):
    """A dataset whose pixels cannot be turned into a model image (message says why)."""


@dataclass(frozen=True)
class Window:
    center: float
    width: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)) or self.width <= 0:
            raise PreprocessError(f"invalid window center={self.center} width={self.width}")


@dataclass
class ModelImage:
    """One 2-D frame prepared for the engine, with what is needed to map results back."""

    pixels: np.ndarray  # H x W x 3 uint8 on the source grid (downscaled only over 20 megapixels)
    sop_instance_uid: str
    frame_index: int  # 0-based frame within a multi-frame source, 0 otherwise
    source_rows: int
    source_columns: int
    window: Window | None
    position: float | None = None  # signed distance along the slice normal, if known
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- decoding


def decode_frames(ds: Dataset) -> np.ndarray:
    """All frames as float32 (F, R, C) or (F, R, C, 3) after the modality LUT (rescale).

    Colour data comes back as RGB: pydicom converts YBR_FULL/YBR_FULL_422 for us, and
    JPEG 2000's YBR_RCT/ICT is decoded straight to RGB by the codec.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PreprocessError("dataset has no pixel data")
    try:
        arr = pydicom.pixels.pixel_array(ds, as_rgb=True)
    except Exception as exc:  # every codec raises its own type
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise PreprocessError(f"cannot decode pixel data (transfer syntax {ts}): {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    if frames == 1:
        arr = arr[np.newaxis]
    if samples == 1:
        arr = pydicom.pixels.apply_modality_lut(arr, ds)
    out = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise PreprocessError("pixel data contains NaN or Inf")
    return out


def choose_window(
    ds: Dataset, frame: np.ndarray, window: str | tuple[float, float] | list[float] | None
) -> Window | None:
    """Resolve a window: explicit (center, width), a preset name, "dicom", "auto" or None.

    None means: the dataset's own window if it has one, else the modality preset, else
    min/max of the frame. RGB data is never windowed.
    """
    if frame.ndim == 3:
        return None
    if isinstance(window, tuple | list):  # (center, width); JSON parameters arrive as a list
        if len(window) != 2:
            raise PreprocessError(f"a window is [center, width], got {window!r}")
        return Window(float(window[0]), float(window[1]))
    if isinstance(window, str) and window not in ("dicom", "auto"):
        if window not in CT_PRESETS:
            raise PreprocessError(f"unknown window preset {window!r}; known: {', '.join(sorted(CT_PRESETS))}")
        return Window(*CT_PRESETS[window])
    if window in (None, "dicom") and "WindowCenter" in ds and "WindowWidth" in ds:
        center = ds.WindowCenter
        width = ds.WindowWidth
        # multi-valued windows: the first is the primary one by convention
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if width > 0:
            return Window(center, width)
    if window in (None, "dicom"):
        preset = MODALITY_DEFAULT_PRESET.get(str(ds.get("Modality", "")))
        if preset:
            return Window(*CT_PRESETS[preset])
    lo, hi = float(frame.min()), float(frame.max())
    if hi <= lo:
        hi = lo + 1.0
    return Window((lo + hi) / 2.0, hi - lo)


def _voi_dataset(center: float, width: float, function: str = "LINEAR") -> Dataset:
    """The VOI LUT module attributes pydicom's windowing needs, with an 8-bit unsigned output
    range (BitsStored 8, no rescale), so `apply_windowing` returns 0..255 directly."""
    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored = 8
    voi.PixelRepresentation = 0
    voi.WindowCenter = center
    voi.WindowWidth = width
    voi.VOILUTFunction = function
    return voi


def apply_window(frame: np.ndarray, window: Window | None, function: str = "LINEAR") -> np.ndarray:
    """VOI window to uint8 by pydicom's `apply_windowing` (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT,
    SIGMOID); RGB frames (window None) are clipped or scaled only.

    Raises PreprocessError for a window pydicom refuses (e.g. LINEAR width below 1)."""
    if window is None:
        return np.clip(frame, 0, 255).astype(np.uint8) if frame.max() <= 255 else _scale_rgb(frame)
    function = function if function in VOI_FUNCTIONS else "LINEAR"
    width = max(window.width, 1.0) if function == "LINEAR" else window.width
    try:
        y = pydicom.pixels.apply_windowing(frame, _voi_dataset(window.center, width, function))
    except ValueError as exc:
        raise PreprocessError(f"cannot apply the VOI window: {exc}") from exc
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def uses_source_voi(ds: Dataset, frame: np.ndarray, window: str | tuple[float, float] | list[float] | None) -> bool:
    """True when the model input follows the source's own VOI LUT module (no window asked for, or
    "dicom") and the source has one: a VOI LUT Sequence or a window. Colour frames: never."""
    if frame.ndim != 2 or window not in (None, "dicom"):
        return False
    if ds.get("VOILUTSequence"):
        return True
    width = ds.get("WindowWidth")
    if width is None or "WindowCenter" not in ds:
        return False
    try:  # a zero or negative width is a broken window: the fallback chain in choose_window applies
        return float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width) > 0
    except (TypeError, ValueError):
        return False


def apply_voi_lut_sequence(ds: Dataset, frame: np.ndarray) -> np.ndarray | None:
    """The source's first VOI LUT Sequence item applied by pydicom (`apply_voi`), scaled to uint8;
    None when the source has no VOI LUT Sequence. PS3.3 C.11.2.1.1."""
    seq = ds.get("VOILUTSequence")
    if not seq:
        return None
    item = seq[0]
    try:
        y = pydicom.pixels.apply_voi(frame, ds, index=0)
        bits = int(item.LUTDescriptor[2])
    except Exception as exc:  # malformed LUT descriptor or data: pydicom raises several types
        raise PreprocessError(f"cannot apply the VOI LUT Sequence: {exc}") from exc
    top = float(2**bits - 1) if 1 <= bits <= 16 else float(np.max(y)) or 1.0
    return np.clip(np.rint(np.asarray(y, dtype=np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _scale_rgb(frame: np.ndarray) -> np.ndarray:
    hi = float(frame.max()) or 1.0
    return np.clip(np.rint(frame * (255.0 / hi)), 0, 255).astype(np.uint8)


def to_rgb8(ds: Dataset, frame: np.ndarray, window: Window | None, *, source_voi: bool = False) -> np.ndarray:
    """One decoded frame to H x W x 3 uint8 with MONOCHROME1 inverted.

    With ``source_voi`` the source's own VOI transform is used (its VOI LUT Sequence, else its
    window with its VOILUTFunction), as PS3.3 C.11.2 defines it; otherwise ``window``, linear."""
    img = apply_voi_lut_sequence(ds, frame) if source_voi and frame.ndim == 2 else None
    if img is None:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper() if source_voi else "LINEAR"
        img = apply_window(frame, window, function)
    if img.ndim == 2:
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            img = 255 - img  # MONOCHROME1: low values are white
        img = np.repeat(img[:, :, np.newaxis], 3, axis=2)
    return np.ascontiguousarray(img)


# --------------------------------------------------------------------------- geometry


def slice_position(ds: Dataset) -> float | None:
    """Signed distance of a single-frame slice along its normal (None without geometry)."""
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, ValueError, TypeError):
        return None
    if iop.shape != (6,) or ipp.shape != (3,):
        return None
    normal = np.cross(iop[:3], iop[3:])
    return float(np.dot(normal, ipp))


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Order by position along the normal, falling back to InstanceNumber."""
    positions = [slice_position(d) for d in datasets]
    if all(p is not None for p in positions):
        order = sorted(range(len(datasets)), key=lambda i: positions[i])  # type: ignore[arg-type, return-value]
    else:
        order = sorted(range(len(datasets)), key=lambda i: int(datasets[i].get("InstanceNumber", 0) or 0))
    return [datasets[i] for i in order]


def select_indices(n: int, mode: str | int) -> list[int]:
    """Which of n ordered slices to send to a 2-D model.

    "all" | "middle" | "key:N" (N slices evenly spread over the central 80 % of the volume,
    where anatomy of interest usually lies and table/air ends are avoided) |
    "every:K" (every K-th slice) | an int N (same as "key:N").
    """
    if n <= 0:
        return []
    if isinstance(mode, int):
        mode = f"key:{mode}"
    if mode == "all":
        return list(range(n))
    if mode == "middle":
        return [n // 2]
    kind, _, arg = mode.partition(":")
    try:
        k = int(arg)
    except ValueError:
        raise PreprocessError(f"invalid slice selection {mode!r}: use all, middle, key:N or every:K") from None
    if k <= 0:
        raise PreprocessError(f"invalid slice selection {mode!r}: N and K must be positive")
    if kind == "every":
        return list(range(0, n, k))
    if kind == "key":
        if k >= n:
            return list(range(n))
        lo, hi = 0.1 * (n - 1), 0.9 * (n - 1)
        picks = np.linspace(lo, hi, k) if k > 1 else np.array([(n - 1) / 2])
        return sorted({int(round(p)) for p in picks})
    raise PreprocessError(f"invalid slice selection {mode!r}: use all, middle, key:N or every:K")


# --------------------------------------------------------------------------- resizing


def fit_within(rows: int, cols: int, max_side: int | None, max_pixels: int = MAX_ENGINE_PIXELS) -> tuple[int, int]:
    """Aspect-preserving size with the longer side at most max_side (None: any) and at most max_pixels.

    Never upscales.
    """
    scale = min(1.0, max_side / max(rows, cols)) if max_side else 1.0
    scale = min(scale, math.sqrt(max_pixels / (rows * cols)))
    r, c = max(1, round(rows * scale)), max(1, round(cols * scale))
    if r * c > max_pixels:  # rounding up overshot the pixel limit
        r, c = max(1, int(rows * scale)), max(1, int(cols * scale))
    return r, c


def resize_rgb(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if img.shape[:2] == (rows, cols):
        return img
    return np.asarray(Image.fromarray(img).resize((cols, rows), Image.Resampling.BICUBIC))


def resample_to_source(image: np.ndarray, rows: int, cols: int, *, nearest: bool = False) -> np.ndarray:
    """Resample a model output (H x W or H x W x C, any aspect) back onto a rows x cols grid.

    Model outputs may be padded/resized to multiples of the patch size; results are stretched
    back to the full source field of view, which is what the forward resize mapped.
    """
    if image.ndim not in (2, 3):
        raise PreprocessError(f"expected a 2-D or RGB image, got shape {image.shape}")
    if image.shape[:2] == (rows, cols):
        return image.copy()
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((cols, rows), method))
    chans = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    out = [np.asarray(Image.fromarray(ch.astype(np.float32), mode="F").resize((cols, rows), method)) for ch in chans]
    return out[0] if image.ndim == 2 else np.stack(out, axis=-1)


def mask_from_output(image: np.ndarray, rows: int, cols: int, threshold: int = 128) -> np.ndarray:
    """A generated mask image (RGB or gray uint8) -> boolean mask on the source grid."""
    gray = image.mean(axis=2) if image.ndim == 3 else image.astype(np.float32)
    gray = resample_to_source(gray.astype(np.float32), rows, cols)
    return gray >= threshold


# --------------------------------------------------------------------------- entry points


def dataset_to_images(
    ds: Dataset,
    *,
    window: str | tuple[float, float] | None = None,
    frames: str | int = "all",
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> list[ModelImage]:
    """Every selected frame of one dataset (single- or multi-frame) as model images."""
    data = decode_frames(ds)
    idx = select_indices(data.shape[0], frames) if data.shape[0] > 1 else [0]
    rows, cols = int(ds.Rows), int(ds.Columns)
    out_r, out_c = fit_within(rows, cols, max_side)
    images = []
    for i in idx:
        frame = data[i]
        win = choose_window(ds, frame, window)
        source_voi = uses_source_voi(ds, frame, window)
        rgb = resize_rgb(to_rgb8(ds, frame, win, source_voi=source_voi), out_r, out_c)
        notes = [] if (out_r, out_c) == (rows, cols) else [f"downscaled {rows}x{cols} -> {out_r}x{out_c}"]
        if source_voi and ds.get("VOILUTSequence"):
            notes.append("the source's VOI LUT Sequence was applied")
        elif source_voi and str(ds.get("VOILUTFunction", "LINEAR")).upper() != "LINEAR":
            notes.append(f"the source's {str(ds.VOILUTFunction).upper()} VOI function was applied")
        images.append(
            ModelImage(
                pixels=rgb,
                sop_instance_uid=str(ds.SOPInstanceUID),
                frame_index=i,
                source_rows=rows,
                source_columns=cols,
                window=win,
                position=slice_position(ds),
                notes=notes,
            )
        )
    return images


def series_to_images(
    datasets: Sequence[Dataset],
    *,
    window: str | tuple[float, float] | None = None,
    slices: str | int = "all",
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> list[ModelImage]:
    """A series (single-frame slices in any order, or multi-frame objects) as model images.

    Single-frame slices are sorted along the slice normal and `slices` picks among them;
    multi-frame objects apply `slices` to their frames. Pixels are decoded only for the
    selected slices.
    """
    single = [d for d in datasets if int(d.get("NumberOfFrames", 1) or 1) == 1]
    multi = [d for d in datasets if int(d.get("NumberOfFrames", 1) or 1) > 1]
    out: list[ModelImage] = []
    ordered = sort_slices(single)
    for i in select_indices(len(ordered), slices):
        out.extend(dataset_to_images(ordered[i], window=window, max_side=max_side))
    for d in multi:
        out.extend(dataset_to_images(d, window=window, frames=slices, max_side=max_side))
    return out
