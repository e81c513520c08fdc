"""Previews of the AI results for the console: SR text, SEG outlines on their source slices,
thumbnails of SC and derived images.

The SEG overlay follows the SEG's own references (PS3.3 C.8.20.3: per-frame Derivation Image
Sequence -> Source Image Sequence -> Referenced SOP Instance UID), so a mask is drawn on the
very slice it was computed on. Windowing and MONOCHROME1 handling come from
`inference.preprocess` (the same pixels the model saw).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

from inference.preprocess import choose_window, decode_frames, to_rgb8

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
OUTLINE_RGB = (255, 48, 48)


class PreviewError(ValueError):
    """The object cannot be previewed; the message says why in one sentence."""


def sr_text(path: Path) -> list[dict[str, Any]]:
    """The SR content tree as rows {depth, name, value} (containers have value None)."""
    ds = pydicom.dcmread(path)
    rows: list[dict[str, Any]] = []
    title = _meaning(ds.get("ConceptNameCodeSequence"))
    if title:
        rows.append({"depth": 0, "name": title, "value": None})
    _walk(ds.get("ContentSequence") or [], 1, rows)
    return rows


def _meaning(seq: Any) -> str:
    return str(seq[0].get("CodeMeaning", "")) if seq else ""


def _walk(items: Any, depth: int, rows: list[dict[str, Any]]) -> None:
    for item in items:
        vt = item.get("ValueType", "")
        name = _meaning(item.get("ConceptNameCodeSequence"))
        value: str | None
        if vt == "TEXT":
            value = str(item.get("TextValue", ""))
        elif vt == "CODE":
            value = _meaning(item.get("ConceptCodeSequence"))
        elif vt == "NUM":
            mv = (item.get("MeasuredValueSequence") or [None])[0]
            value = f"{mv.NumericValue} {_meaning(mv.get('MeasurementUnitsCodeSequence'))}".strip() if mv else ""
        elif vt == "CONTAINER":
            value = None
        else:
            continue  # references, UIDs, dates: not what a reader wants in a preview
        rows.append({"depth": depth, "name": name, "value": value})
        if "ContentSequence" in item:
            _walk(item.ContentSequence, depth + 1, rows)


def _fit(pil: Image.Image, size: int) -> Image.Image:
    """Longest side `size` px: shrink smoothly, enlarge small images with visible pixels."""
    scale = size / max(pil.width, pil.height)
    new = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    return pil.resize(new, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)


def _png(img: np.ndarray, size: int) -> bytes:
    pil = _fit(Image.fromarray(img), size)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(ds: Dataset, frame_index: int = -1) -> np.ndarray:
    frames = decode_frames(ds)  # (frames, rows, cols[, 3])
    frame = frames[frame_index if frame_index >= 0 else len(frames) // 2]
    return to_rgb8(ds, frame, choose_window(ds, frame, None))


def thumbnail_png(path: Path, size: int = 192) -> bytes:
    """A PNG thumbnail (longest side `size` px) of the middle frame of an image object."""
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise PreviewError("the object has no pixel data")
    return _png(_rgb(ds), size)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with at least one 4-neighbour outside it (a one-pixel contour)."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _frame_source(seg: Dataset, i: int) -> tuple[str | None, int]:
    """(referenced SOP Instance UID, 0-based frame in it) of SEG frame i."""
    try:
        src = seg.PerFrameFunctionalGroupsSequence[i].DerivationImageSequence[0].SourceImageSequence[0]
    except (AttributeError, IndexError):
        return None, 0
    number = int(src.get("ReferencedFrameNumber", 1) or 1)
    return str(src.ReferencedSOPInstanceUID), number - 1


def seg_overlay_png(
    path: Path, source_path: Callable[[str], Path | None], *, key_slices: int = 3, size: int = 160
) -> bytes:
    """Up to `key_slices` source slices with the most segmented pixels, each with the mask outline
    drawn in colour, side by side in one PNG (each tile `size` px). Raises PreviewError when the
    SEG is empty or its sources are not stored here."""
    seg = pydicom.dcmread(path)
    if str(seg.SOPClassUID) != SEG_SOP_CLASS:
        raise PreviewError("not a Segmentation object")
    masks = np.asarray(seg.pixel_array)
    if masks.ndim == 2:
        masks = masks[np.newaxis]
    masks = masks > 0
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    order = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] > 0][:key_slices]
    if not order:
        raise PreviewError("the segmentation is empty (no segmented pixel)")
    tiles = []
    cache: dict[str, Dataset] = {}
    for i in sorted(order, key=lambda k: _frame_source(seg, k)[0] or ""):
        uid, frame = _frame_source(seg, i)
        p = source_path(uid) if uid else None
        if p is None:
            continue
        ds = cache.get(uid or "") or pydicom.dcmread(p)
        cache[uid or ""] = ds
        img = _rgb(ds, frame).copy()
        mask = masks[i]
        if mask.shape != img.shape[:2]:
            continue
        img[_outline(mask)] = OUTLINE_RGB
        tiles.append(_fit(Image.fromarray(img), size))
    if not tiles:
        raise PreviewError("the source slices of this segmentation are not stored here")
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)))
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + 4
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return buf.getvalue()
