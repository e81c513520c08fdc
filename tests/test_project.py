"""Project-wide checks: lint, layout rules from DESIGN.md, console script."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_ruff_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_engine_has_no_dicom_db_or_celery_imports() -> None:
    banned = ("pydicom", "pynetdicom", "highdicom", "sqlmodel", "sqlalchemy", "celery", "kombu", "dicom_node")
    offenders = []
    for path in (REPO / "inference" / "engine").rglob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ", "from ")) and any(f" {b}" in s or f" {b}." in s for b in banned):
                offenders.append(f"{path.relative_to(REPO)}: {s}")
    assert not offenders, offenders


def test_sr_writers_do_not_import_the_node() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "sr_writers").rglob("*.py")
        if "dicom_node" in p.read_text() and "import" in p.read_text()
    ]
    assert not offenders, offenders


def test_console_script_lists_commands() -> None:
    r = subprocess.run([str(REPO / ".venv" / "bin" / "unimedvl"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "bench" in r.stdout
