"""Fixtures for the peer launchers and the ingest benchmark tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.peers import OrthancServer, StoreSCP
from dicom_node.synthetic import make_ct_series
from tests.conftest import require_tool


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    """Four small synthetic CT slices (64x64) of one series."""
    return make_ct_series(tmp_path / "ct", 4, rows=64, cols=64, seed=1)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    require_tool("Orthanc")
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    require_tool("storescp")
    with StoreSCP(tmp_path / "storescp") as scp:
        yield scp
