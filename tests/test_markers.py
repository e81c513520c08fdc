"""Test selection means what it says: `-m "not orthanc"` (postgres, rabbitmq, dcmtk) leaves out
every test that uses the component, and a test that uses one without its marker fails.

Runs a small pytest session in a subprocess with tests/conftest.py's hooks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO

INNER_TESTS = """
import pytest
from tests.conftest import require_tool


@pytest.fixture
def orthanc():
    return "a stand-in: only the fixture's name matters to the marker hook"


def test_orthanc_by_fixture(orthanc):
    pass


def test_orthanc_without_marker():
    require_tool("Orthanc")


@pytest.mark.orthanc
def test_orthanc_with_marker():
    require_tool("Orthanc")


def test_dicom3tools_without_marker():
    require_tool("dciodvfy")


def test_database(db_url):
    pass


def test_postgres_by_fixture(pg_url):
    pass


def test_plain():
    pass
"""


def _run(tmp_path: Path, *args: str) -> str:
    """The inner session's output (-rA: a PASSED/FAILED line per test)."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    markers = "".join(f"    {m}: x\n" for m in ("postgres", "rabbitmq", "dcmtk", "orthanc", "slow"))
    (tmp_path / "pytest.ini").write_text(f"[pytest]\naddopts = --strict-markers\nmarkers =\n{markers}")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-q", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.stdout + r.stderr


def test_not_orthanc_leaves_out_every_orthanc_test(tmp_path: Path) -> None:
    out = _run(tmp_path, "--collect-only", "-m", "not orthanc and not postgres")
    collected = {line.split("::", 1)[1] for line in out.splitlines() if "::" in line}
    assert collected == {
        "test_orthanc_without_marker",
        "test_dicom3tools_without_marker",
        "test_database[sqlite]",
        "test_plain",
    }, out


def test_a_test_using_a_component_without_its_marker_fails(tmp_path: Path) -> None:
    out = _run(tmp_path, "-k", "without_marker or with_marker")
    assert "FAILED test_inner.py::test_orthanc_without_marker" in out, out
    assert "uses Orthanc but is not marked 'orthanc'" in out, out
    assert "FAILED test_inner.py::test_dicom3tools_without_marker" in out, out
    assert "uses dciodvfy but is not marked 'dcmtk'" in out, out
    assert "PASSED test_inner.py::test_orthanc_with_marker" in out, out
