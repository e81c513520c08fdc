"""Fixtures for the research batch tests: tiny identified studies on disk, configs, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import REPO
from tests.jobs.conftest import rabbit_vhost  # noqa: F401  (fixture re-exported for this folder)

# Values that identify the patient: none may survive de-identification anywhere.
IDENTITIES = [
    {"PatientName": "DOE^JANE^Q", "PatientID": "MRN-4711-JD", "PatientBirthDate": "19610315"},
    {"PatientName": "ROE^RICHARD", "PatientID": "MRN-9035-RR", "PatientBirthDate": "19790822"},
]
EXTRA = {
    "AccessionNumber": "ACC-88172",
    "InstitutionName": "St Elsewhere General",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "OperatorsName": "OPERATOR^ALICE",
    "StudyDate": "20240517",
    "StudyID": "STUDY-5521",
    "PatientAddress": "12 Baker Street London",
    "OtherPatientIDs": "NHS-998877",
}


def identify(paths: list[Path], identity: dict[str, str], *, description: str | None = None) -> None:
    """Stamp identifying attributes on files (and a StudyDescription naming the patient)."""
    for p in paths:
        ds = dcmread(p)
        for k, v in {**identity, **EXTRA}.items():
            setattr(ds, k, v)
        ds.StudyDescription = description or f"CHEST for {identity['PatientName'].split('^')[0]}"
        ds.PatientSex = "F"
        ds.PatientAge = "063Y"
        ds.add_new(0x00091001, "LO", "private identifying text MRN-4711-JD")
        ds.save_as(p, enforce_file_format=True)


def make_archive(root: Path, *, n_cr: int = 2, ct_slices: int = 2, us: bool = True) -> dict[str, Any]:
    """A folder archive: n_cr CR studies (first two of patient 0), one CT study of patient 1,
    one US study (burned-in candidate) of patient 1, a non-DICOM file and nested folders."""
    from dicom_node.synthetic import make_cr, make_ct_series

    studies: dict[str, list[Path]] = {}
    for i in range(n_cr):
        uid = generate_uid()
        p = make_cr(root / f"cr{i}" / "x" / "y", rows=48, cols=48, seed=i, study_uid=uid)
        identify([p], IDENTITIES[0 if i < 2 else 1])
        studies[uid] = [p]
    if ct_slices:
        uid = generate_uid()
        ps = make_ct_series(root / "ct", ct_slices, rows=32, cols=32, study_uid=uid)
        identify(ps, IDENTITIES[1])
        studies[uid] = ps
    if us:
        uid = generate_uid()
        p = make_cr(root / "us", rows=48, cols=48, seed=9, study_uid=uid)
        ds = dcmread(p)
        ds.Modality = "US"
        ds.save_as(p, enforce_file_format=True)
        identify([p], IDENTITIES[1])
        studies[uid] = [p]
    (root / "README.txt").write_text("not a DICOM file\n")
    return studies


def identifying_values(paths: list[Path]) -> set[str]:
    """Every identifying string of the inputs: patient values, EXTRA, and every UID."""
    values: set[str] = set()
    for p in paths:
        ds = dcmread(p)
        for k in ("PatientName", "PatientID", "PatientBirthDate", *EXTRA):
            v = str(ds.get(k, "") or "")
            if v:
                values.add(v)
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            v = str(ds.get(k, "") or "")
            if v:
                values.add(v)
    values |= {v.split("^")[0] for v in values if "^" in v}  # family names alone
    return values


def fixed_length_rules(folder: Path, steps: int) -> Path:
    """A batch rules file (`--rules`) whose one task takes a fixed time per item: a synthesized
    256x256 image of `steps` denoising steps (~20 ms a step on a 2-core CPU). For tests that kill,
    disturb or overtake a batch mid-run: a report's length depends on where the tiny model emits
    a stop token (and on how warm the worker is), so a batch of reports can end before the test
    acts on a fast machine."""
    rules = folder / "fixed_length_rules.toml"
    rules.write_text(
        '[[rules]]\nname = "fixed-length-synthesis"\nmatch = {}\n'
        '[[rules.tasks]]\nkind = "synthesize"\nprompt = "A chest radiograph."\nsize = [256, 256]\n'
        f"steps = {steps}\n"
    )
    return rules


FAST_TASKS = ["--task", "report", "--task", "vqa", "--question", "Is there a nodule?", "--max-new-tokens", "3"]


def run_cli(args: list[str], *, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "archive"
    return root, make_archive(root)
