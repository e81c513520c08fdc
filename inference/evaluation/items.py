"""What a benchmark reader produces: items to run, the files they came from, and the error raised
for a dataset folder that does not hold what its released layout promises."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TASKS = ("vqa", "mcq", "report", "segment", "synthesis")


class DatasetError(ValueError):
    """A dataset folder in the wrong layout, a missing image, an empty reference ...; the message names
    the file and says what was expected."""


@dataclass(frozen=True)
class Source:
    """One picture an item needs: ``path`` read as ``how``.

    ``how``: ``image`` (RGB), ``mask:nonzero`` | ``mask:ge128`` | ``mask:eq0`` | ``mask:lt255`` (a binary
    mask from a label picture), ``nifti:z=N`` (axial slice N of a NIfTI volume, 0.5-99.5 percentile
    windowed to 8 bits)."""

    path: str
    how: str = "image"

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "how": self.how}


@dataclass
class Item:
    """One benchmark question / report / mask / translation.

    ``reference``: the answer text (vqa, mcq: the option letter), a list of report texts (report), or a
    :class:`Source` (segment: the reference mask, or a list of them to unite; synthesis: the target image)."""

    id: str
    task: str
    inputs: list[Source]
    prompt: str
    reference: Any
    answer_type: str | None = None  # vqa: closed | open
    options: dict[str, str] | None = None  # mcq
    group: str | None = None  # image class / modality / direction: scores are also given per group
    target: str | None = None  # segment: what is segmented (mDice averages over targets)


@dataclass
class Dataset:
    benchmark: str
    root: Path
    items: list[Item]
    annotation_files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def file_hashes(self) -> dict[str, Any]:
        """sha256 of each annotation file, and one sha256 over every input/reference file (sorted by
        path relative to the root), so a summary pins exactly what was scored."""
        ann = {str(p.relative_to(self.root)): sha256_file(p) for p in sorted(self.annotation_files)}
        files: set[str] = set()
        for it in self.items:
            files.update(s.path for s in it.inputs)
            files.update(s.path for s in reference_sources(it.reference))
        h = hashlib.sha256()
        for rel in sorted(files):
            h.update(rel.encode() + b"\0" + sha256_file(self.root / rel).encode() + b"\n")
        return {"annotations": ann, "data_files": len(files), "data_sha256": h.hexdigest()}


def reference_sources(reference: Any) -> list[Source]:
    """The files behind a picture reference (one Source, or several whose masks are united)."""
    if isinstance(reference, Source):
        return [reference]
    if isinstance(reference, list) and reference and all(isinstance(r, Source) for r in reference):
        return list(reference)
    return []


def load_reference_mask(root: Path, reference: Any) -> np.ndarray:
    """The union of the reference masks (BUSI lists a second lesion in a second mask file)."""
    srcs = reference_sources(reference)
    masks = [load_source(root, s) for s in srcs]
    for s, m in zip(srcs[1:], masks[1:], strict=True):
        if m.shape != masks[0].shape:
            raise DatasetError(f"{root / s.path}: mask size {m.shape} differs from {root / srcs[0].path}")
    out = masks[0].copy()
    for m in masks[1:]:
        out |= m
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_source(root: Path, src: Source) -> np.ndarray:
    """The picture of ``src``: H x W x 3 uint8 for images and NIfTI slices, H x W bool for masks.
    Raises DatasetError naming the file when it cannot be read."""
    path = root / src.path
    try:
        if src.how.startswith("nifti:"):
            return _nifti_slice(path, int(src.how.split("z=", 1)[1]))
        with Image.open(path) as im:
            if src.how == "image":
                return np.asarray(im.convert("RGB"))
            gray = np.asarray(im.convert("L"))
    except DatasetError:
        raise
    except Exception as exc:  # PIL/SimpleITK raise many types for unreadable files
        raise DatasetError(f"{path}: cannot be read as {src.how} ({exc})") from exc
    rule = src.how.removeprefix("mask:")
    if rule == "nonzero":
        return gray > 0
    if rule == "ge128":
        return gray >= 128
    if rule == "eq0":
        return gray == 0
    if rule == "lt255":
        return gray < 255
    raise DatasetError(f"{path}: unknown mask rule {src.how!r}")


def _nifti_slice(path: Path, z: int) -> np.ndarray:
    import SimpleITK as sitk

    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)  # (z, y, x)
    if vol.ndim != 3 or not 0 <= z < vol.shape[0]:
        raise DatasetError(f"{path}: no axial slice {z} in a volume of shape {vol.shape}")
    lo, hi = np.percentile(vol, [0.5, 99.5])
    sl = np.clip((vol[z] - lo) / (hi - lo) if hi > lo else vol[z] * 0, 0, 1)
    gray = np.rint(sl * 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def inside(folder: Path, name: str, listed_in: Path) -> Path:
    """``folder/name`` for a file named by an annotation file, refusing names that leave the folder."""
    p = (folder / str(name)).resolve()
    if not p.is_relative_to(folder.resolve()):
        raise DatasetError(f"{listed_in}: image name {name!r} points outside {folder}")
    if not p.is_file():
        raise DatasetError(f"{listed_in}: image {name!r} is missing (looked for {folder / str(name)})")
    return p
