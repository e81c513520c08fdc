"""The export benchmark runs end to end on a tiny series (figures are not asserted: timing is not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.export import run
from tests.conftest import require_tool

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]


def test_export_benchmark_produces_all_figures(tmp_path: Path) -> None:
    require_tool("storescu")
    fig = run(n=12, size=64, repeats=1, workdir=tmp_path)
    for key in ("storescu_inst_s", "storescu_x4_inst_s", "dimse_inst_s", "dimse_1assoc_inst_s", "stow_inst_s"):
        assert fig[key] > 0, key
    assert fig["n"] == 12 and fig["dimse_vs_storescu"] > 0
