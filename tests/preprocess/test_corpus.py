"""Every image file of pydicom's test corpus (other vendors' real files: odd transfer syntaxes,
colour models, multi-frame, LUTs, broken headers) becomes model images or a PreprocessError with
a readable one-line reason, never another exception (which the job layer would count as a crash).
The model and writers over real data are covered on `serve` by tests/service/test_real_world.py."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data.data_manager import DATA_ROOT, get_data_dir

from inference import preprocess as pp


def _corpus() -> list[str]:
    """pydicom's bundled test files plus pydicom-data's files where already on disk (listed
    directly: pydicom's get_testdata_files would try to download the missing ones)."""
    roots = [Path(DATA_ROOT) / "test_files", Path(get_data_dir())]
    return sorted({str(f) for r in roots if r.is_dir() for f in r.rglob("*") if f.is_file()})


def _image_files() -> list[str]:
    out = []
    for f in _corpus():
        if os.path.getsize(f) > 4_000_000:  # a few large files add time, not kinds
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not a DICOM file (the corpus holds a few), or unreadable: ingest refuses it
            continue
        if "Rows" in ds and "Columns" in ds and "SOPInstanceUID" in ds:
            out.append(f)
    return out


FILES = _image_files()


def test_the_corpus_is_there() -> None:
    assert len(FILES) > 50


@pytest.mark.parametrize("path", FILES, ids=[Path(f).name for f in FILES])
def test_every_corpus_image_becomes_model_images_or_a_readable_refusal(path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # header oddities: pydicom warns, we judge the outcome
        ds = pydicom.dcmread(path)  # every corpus file parses; one that stops doing so must be looked at
        try:
            images = pp.series_to_images([ds], slices="middle", max_side=128)
        except pp.PreprocessError as exc:
            reason = str(exc)
            assert reason and "\n" not in reason.strip() or "cannot decode" in reason, reason
            return
    assert images, "no image and no reason"
    for img in images:
        assert img.pixels.dtype == np.uint8 and img.pixels.ndim == 3 and img.pixels.shape[2] == 3
        assert max(img.pixels.shape[:2]) <= 128
