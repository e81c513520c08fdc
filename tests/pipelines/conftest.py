"""Fixtures for the pipeline tests: small synthetic sources, the tiny engine, validator checks."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from dicom_node.synthetic import make_cr, make_ct_series
from inference.preprocess import sort_slices
from sr_writers import write
from tests.conftest import require_tool
from tests.sr.test_validators import LABELMAP_KNOWN
from tests.sr.validators import unexpected_dciodvfy, unexpected_dsrdump

# Parameters that keep the tiny model fast on CPU.
FAST = {"max_new_tokens": 8, "steps": 2, "seed": 0}


def _read(paths) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in paths]


@pytest.fixture(scope="session")
def ct_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ct")
    make_ct_series(out, 6, 64, 64, seed=1)
    return out


@pytest.fixture
def ct_series(ct_dir) -> list[Dataset]:
    """6-slice 64x64 CT, fresh datasets per test (tests may modify them), in slice order."""
    return sort_slices(_read(sorted(ct_dir.glob("*.dcm"))))


@pytest.fixture
def cr_image(tmp_path) -> Dataset:
    return pydicom.dcmread(make_cr(tmp_path / "cr", 128, 128, seed=2))


@pytest.fixture(scope="session")
def engine():
    """The tiny demo model (random weights, CPU): the real engine code path, small and fast."""
    from inference.engine import load_engine

    return load_engine("tiny")


@pytest.fixture(scope="session")
def validators() -> None:
    require_tool("dciodvfy")
    require_tool("dsrdump")


def validate(ds: Dataset, path: Path, *, sr: bool = False) -> list[str]:
    """Findings of dciodvfy -new (and dsrdump for SR) not on the tests/sr allow-list."""
    write(ds, path)
    problems = unexpected_dciodvfy(path)
    if str(ds.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.66.7":  # LABELMAP: unknown to the 2022 validator
        problems = [p for p in problems if not any(k in p for k in LABELMAP_KNOWN)]
    if sr:
        problems += unexpected_dsrdump(path)
    return problems
