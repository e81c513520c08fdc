"""Real hospitals' DICOM through `unimedvl serve` on the embedded defaults (SQLite, embedded
broker, tiny model): each folder of ../shared/cases/real-world gives what its cases.json says,
and no patient identifier reaches any log line.

One `serve` runs for the module: DCMTK `storescu` sends every case folder plus a study with
distinctive patient data through rules that exercise every task kind; the tests then read the
job rows, the output objects in storage and the whole log. (A library warning quoting a value
is covered by tests/node/test_log_phi.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from dicom_node.db import make_engine
from dicom_node.demo import _finished
from dicom_node.jobs.models import Job, JobOutput
from dicom_node.models import Rejection
from tests.conftest import REPO, require_tool
from tests.service.test_serve_demo import Serve
from tests.sr.validators import unexpected_dciodvfy, unexpected_dsrdump

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk, pytest.mark.timeout(900)]

CASES = REPO.parent.parent / "shared" / "cases" / "real-world"
if not CASES.is_dir():  # the worktree layout (/work/wt/X) and the main checkout (/work/main)
    CASES = REPO.parent / "shared" / "cases" / "real-world"

# Distinctive identifiers of the PHI probe study (made up); none may appear in any log line.
PHI = {
    "PatientName": "Quaxbrindle^Zorvath^Ulm",
    "PatientID": "PHI-ID-774411",
    "PatientBirthDate": "19011231",
    "AccessionNumber": "ACC-PHI-55310",
    "OtherPatientIDs": "OTHER-ID-90817",
    "ReferringPhysicianName": "Vexholm^Dariusz",
}

# Each folder is sent under its own calling AE, so each gets only the tasks its contract needs
# (the tiny model is slow on a loaded 2-core machine); the PHI probe gets every task kind.
SENDER = {
    "cr_charset_iso2022_japanese": "RW_CHARSET",
    "cr_charset_misspelled_utf8": "RW_CHARSET",
    "ct_grid_15x17": "RW_GRID",
    "ct_no_patient_id": "RW_NOPID",
    "ct_two_series_one_broken": "RW_BROKEN",
    "us_8bit": "RW_US",
    "us_retired_sop_class": "RW_RETIRED",
    "phi_probe": "RW_PHI",
}
FAST = {"steps": 2, "max_new_tokens": 2}
RULES = [
    {
        "name": "charset",
        "match": {"calling_ae": ["RW_CHARSET"]},
        "tasks": [{"kind": "report", **FAST}, {"kind": "vqa", "questions": ["Effusion?"], **FAST}],
    },
    {
        "name": "grid",
        "match": {"calling_ae": ["RW_GRID"]},
        "tasks": [{"kind": "segment", "slices": "all", "targets": [{"label": "lesion"}], **FAST}],
    },
    {
        "name": "no-patient-id",
        "match": {"calling_ae": ["RW_NOPID"]},
        "tasks": [
            {"kind": "report", "slices": "middle", **FAST},
            {"kind": "segment", "slices": "middle", "targets": [{"label": "lesion"}], **FAST},
        ],
    },
    {"name": "broken", "match": {"calling_ae": ["RW_BROKEN"]}, "tasks": [{"kind": "report", "slices": "all", **FAST}]},
    {
        "name": "ultrasound",
        "match": {"calling_ae": ["RW_US"]},
        "tasks": [{"kind": "super_resolve", "slices": "all", "prompt": "Sharpen.", **FAST}],
    },
    {"name": "retired", "match": {"calling_ae": ["RW_RETIRED"]}, "tasks": [{"kind": "report", **FAST}]},
    {
        "name": "phi-ct",
        "match": {"calling_ae": ["RW_PHI"], "Modality": ["CT"]},
        "tasks": [
            {"kind": "report", "slices": "middle", **FAST},
            {"kind": "segment", "slices": "middle", "targets": [{"label": "lesion"}], **FAST},
            {"kind": "translate", "slices": "middle", "prompt": "To MR.", **FAST},
            {"kind": "super_resolve", "slices": "middle", "prompt": "Sharpen.", **FAST},
        ],
    },
    {
        "name": "phi-cr",
        "match": {"calling_ae": ["RW_PHI"], "Modality": ["CR"]},
        "tasks": [
            {"kind": "vqa", "questions": ["Effusion?"], **FAST},
            {"kind": "synthesize", "prompt": "Chest radiograph.", "size": [32, 32], **FAST},
        ],
    },
]


def _toml(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(v)


def write_config(folder: Path) -> Path:
    from tests.conftest import free_port

    lines = [
        "[node]",
        'host = "127.0.0.1"',
        f"port = {free_port()}",
        "[http]",
        f'bind = "127.0.0.1:{free_port()}"',
        "[completion]",
        "study_quiet_seconds = 2",
        "series_quiet_seconds = 1",
        "check_interval_seconds = 0.5",
        "[jobs]",
        "lease_seconds = 20",
        "sweep_interval_seconds = 1",
        "planned_grace_seconds = 1",
    ]
    for rule in RULES:
        lines += ["[[rules]]", f"name = {_toml(rule['name'])}", f"match = {_toml(rule['match'])}"]
        for task in rule["tasks"]:
            lines.append("[[rules.tasks]]")
            lines += [f"{k} = {_toml(v)}" for k, v in task.items()]
    cfg = folder / "unimedvl.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def phi_study(folder: Path) -> Path:
    """A 3-slice CT and a CR in one study carrying the PHI probe values."""
    from dicom_node.synthetic import make_cr, make_ct_series

    study_uid = generate_uid()
    files = make_ct_series(folder, 3, 32, 32, study_uid=study_uid)
    files.append(make_cr(folder, 48, 48, study_uid=study_uid))
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for f in files:
            ds = pydicom.dcmread(f)
            for key, value in PHI.items():
                setattr(ds, key, value)
            ds.save_as(f)
    finally:
        pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    return folder


@dataclass
class CaseRun:
    folder: Path
    study_uid: str
    sent: subprocess.CompletedProcess
    jobs: list[Job] = field(default_factory=list)
    outputs: dict[int, list[tuple[JobOutput, Path]]] = field(default_factory=dict)
    timeline: dict[str, Any] | None = None


@dataclass
class Run:
    serve: Serve
    cases: dict[str, CaseRun]
    log: str
    rejections: list[dict[str, Any]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    storescu = require_tool("storescu")
    require_tool("dciodvfy")
    tmp = tmp_path_factory.mktemp("real-world")
    serve = Serve(write_config(tmp))
    folders = {p.name: p for p in sorted(CASES.iterdir()) if p.is_dir()}
    folders["phi_probe"] = phi_study(tmp / "phi_probe")
    try:
        serve.start()
        cases: dict[str, CaseRun] = {}
        for name, folder in folders.items():
            first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)
            # DCMTK's storescu cannot propose retired SOP classes; old modalities do, as
            # pynetdicom's storescu does with -cx (each file's own SOP class and syntax).
            sender = (
                [sys.executable, "-m", "pynetdicom", "storescu", "-r", "-cx"]
                if name == "us_retired_sop_class"
                else [storescu, "+sd", "+r", "-nh"]  # -nh: a refused file does not stop the rest, as on a modality
            )
            sent = subprocess.run(
                [*sender, "-aet", SENDER[name], "-aec", "UNIMEDVL", "127.0.0.1", str(serve.settings.node.port)]
                + [str(folder)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            cases[name] = CaseRun(folder, str(first.StudyInstanceUID), sent)
        deadline = time.monotonic() + 420
        for case in cases.values():
            while time.monotonic() < deadline:
                case.timeline = serve.timeline(case.study_uid)
                if case.timeline is not None and _finished(case.timeline):
                    break
                if case.sent.returncode != 0 and case.timeline is None and time.monotonic() > deadline - 400:
                    break  # refused at the door: nothing to wait for
                time.sleep(0.5)
        engine = make_engine(serve.settings.database.url)
        with Session(engine) as s:
            rejections = [r.model_dump() for r in s.exec(select(Rejection))]
            for case in cases.values():
                case.jobs = list(s.exec(select(Job).where(Job.study_instance_uid == case.study_uid).order_by(Job.id)))
                for job in case.jobs:
                    rows = s.exec(select(JobOutput).where(JobOutput.job_id == job.id)).all()
                    case.outputs[job.id or 0] = [(r, Path(serve.settings.storage.path) / r.relpath) for r in rows]
        engine.dispose()
        assert serve.stop() == 0
        yield Run(serve, cases, serve.log.read_text(errors="replace"), rejections)
    finally:
        if serve.proc is not None and serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait(10)


def _outputs(case: CaseRun, kind: str | None = None) -> list[tuple[JobOutput, pydicom.Dataset, Path]]:
    found = []
    for job in case.jobs:
        if kind is not None and job.kind != kind:
            continue
        for row, path in case.outputs.get(job.id or 0, []):
            found.append((row, pydicom.dcmread(path), path))
    return found


def _no_crash(case: CaseRun) -> None:
    for job in case.jobs:
        error = job.error or ""
        assert "Traceback" not in error and "internal error" not in error, (job.kind, error)
        assert job.crashes == 0, (job.kind, job.crashes)
        assert job.state in ("done", "failed"), (job.kind, job.state)
        if job.state == "failed":
            assert error and "\n" not in error, (job.kind, error)


def _valid(path: Path, ds: pydicom.Dataset, source_errors: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    problems = [p for p in unexpected_dciodvfy(path) if p.startswith("Error") and p not in source_errors]
    if ds.Modality == "SR":
        problems += unexpected_dsrdump(path)
    return problems


def _expect_srs(case: CaseRun, kinds: tuple[str, ...]) -> list[pydicom.Dataset]:
    _no_crash(case)
    found = []
    for kind in kinds:
        jobs = [j for j in case.jobs if j.kind == kind]
        assert jobs and all(j.state == "done" for j in jobs), [(j.kind, j.state, j.error) for j in case.jobs]
        for _, ds, path in _outputs(case, kind):
            assert _valid(path, ds) == [], kind
            found.append(ds)
    return found


def test_misspelled_utf8_charset(run: Run) -> None:
    """cases.json: report and VQA SRs, UTF-8, PatientName Müller^Jörg."""
    for ds in _expect_srs(run.cases["cr_charset_misspelled_utf8"], ("report", "vqa")):
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "Müller^Jörg"


def test_iso2022_japanese_charset(run: Run) -> None:
    """cases.json: report and VQA SRs carrying the same PatientName, UTF-8."""
    case = run.cases["cr_charset_iso2022_japanese"]
    source = pydicom.dcmread(sorted(case.folder.glob("*.dcm"))[0], stop_before_pixels=True)
    for ds in _expect_srs(case, ("report", "vqa")):
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == str(source.PatientName)


def test_missing_patient_id(run: Run) -> None:
    """cases.json: outputs with an empty (Type 2) PatientID, no crash."""
    case = run.cases["ct_no_patient_id"]
    for ds in _expect_srs(case, ("report", "segment")):
        assert "PatientID" in ds and not ds.PatientID


def test_one_broken_series_fails_alone_named(run: Run) -> None:
    """cases.json: the good series gets its outputs; the broken one fails alone, named.

    The broken MR slice has truncated Pixel Data. Since issue 15 the node refuses such an
    instance at the door (0xA900 with a reason, recorded as a rejection naming its SOP class and
    calling AE), so the sender keeps its copy; the rest of the study, including the MR series'
    intact slices, is processed as usual and gets its outputs."""
    case = run.cases["ct_two_series_one_broken"]
    _no_crash(case)
    refused = [r for r in run.rejections if r["calling_ae"] == SENDER["ct_two_series_one_broken"]]
    assert len(refused) == 1 and refused[0]["stage"] == "store" and refused[0]["status"] == 0xA900, refused
    assert "Pixel Data" in refused[0]["detail"], refused[0]
    by_series: dict[str, list[Job]] = {}
    for job in case.jobs:
        by_series.setdefault(job.series_uids[0], []).append(job)
    assert len(by_series) == 2 and all(len(j.series_uids) == 1 for j in case.jobs)
    assert all(j.state == "done" and case.outputs[j.id or 0] for j in case.jobs), [
        (j.state, j.error) for j in case.jobs
    ]


def test_seg_on_a_15x17_grid(run: Run) -> None:
    """cases.json: a SEG on the source's 15x17 grid with one frame per source slice (the OHIF
    adapter check of these frames is the writers' js harness, tests/js)."""
    case = run.cases["ct_grid_15x17"]
    (seg,) = [ds for _, ds, _ in _outputs(case, "segment") if ds.Modality == "SEG"]
    _no_crash(case)
    assert (seg.Rows, seg.Columns) == (15, 17)
    sources = {d.SOPInstanceUID: d for d in (pydicom.dcmread(p) for p in case.folder.glob("*.dcm"))}
    refs = [
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(refs) == sorted(sources)  # slices "all": a frame per source slice
    for frame, uid in zip(seg.PerFrameFunctionalGroupsSequence, refs, strict=True):
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(ipp, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-3)


def _derived_like_source(case: CaseRun) -> None:
    _no_crash(case)
    source = pydicom.dcmread(sorted(case.folder.glob("*.dcm"))[0])
    derived = [(ds, p) for kind in ("super_resolve", "translate") for _, ds, p in _outputs(case, kind)]
    assert derived, [(j.kind, j.state, j.error) for j in case.jobs]
    source_errors = set(unexpected_dciodvfy(sorted(case.folder.glob("*.dcm"))[0]))
    for ds, path in derived:
        for key in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "Rows", "Columns"):
            assert ds[key].value == source[key].value, key
        assert _valid(path, ds, source_errors) == []


def test_8bit_ultrasound_gives_8bit_derived_images(run: Run) -> None:
    """cases.json: a derived US image with 8-bit pixels like its source (super_resolve/translate)."""
    _derived_like_source(run.cases["us_8bit"])


def test_retired_us_storage_class(run: Run) -> None:
    """cases.json: accepted (retired storage classes still arrive) or, if refused, recorded."""
    case = run.cases["us_retired_sop_class"]
    if case.sent.returncode == 0 and case.timeline is not None:
        _no_crash(case)
        assert case.jobs, "accepted but no job was planned"
    else:  # refused: the rejection is recorded with a reason an operator can act on
        assert run.rejections, case.sent.stderr


def test_no_patient_data_in_any_log_line(run: Run) -> None:
    case = run.cases["phi_probe"]
    _no_crash(case)
    assert {j.kind for j in case.jobs} == {"report", "vqa", "synthesize", "segment", "translate", "super_resolve"}
    assert all(j.state == "done" for j in case.jobs), [(j.kind, j.error) for j in case.jobs]
    assert "withheld" in run.log  # pydicom did warn about the birth date: the guard took its text
    values = set(PHI.values())
    values |= {part for v in PHI.values() for part in v.split("^") if len(part) >= 4}
    for c in run.cases.values():  # the real-world cases' identifiers too
        for path in c.folder.glob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
                value = str(ds.get(key, "") or "")
                for part in {value, *value.replace("=", "^").split("^")}:
                    if len(part) >= 5 and (not part.isdigit() or len(part) >= 8):
                        values.add(part)
    leaked = sorted(v for v in values if v in run.log)
    assert leaked == [], leaked
