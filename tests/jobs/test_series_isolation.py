"""One bad series never sinks the others, and a bug is a crash, not "bad input".

The series is the unit of work: a study with one broken series (each kind of fault in turn)
delivers everything for its good series; the broken one fails alone with a reason that names
the series and the instance; retry re-runs only what failed; re-planning adds nothing. An
unexpected exception (a numpy broadcast error is a ValueError too) is logged with its
traceback, retried, counted in the crash metric and shown as an internal error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from dicom_node.config import load_config
from dicom_node.db import init_db, make_engine
from dicom_node.jobs import DONE, FAILED, PLANNED, Job, JobOutput, Planner, retry_jobs
from dicom_node.jobs.context import WorkerContext
from dicom_node.jobs.metrics import JobCollector
from dicom_node.jobs.runner import RAN_DONE, RAN_FAILED, RETRYING, execute_job
from dicom_node.routing import parse_rules
from dicom_node.storage import Storage
from tests.jobs.conftest import complete_all, ct_study, ingest, write_config

RULES = [
    {
        "name": "ct-report",
        "match": {"Modality": ["CT", "MR"]},
        "tasks": [{"kind": "report", "prompt": "Describe.", "slices": "all", "max_new_tokens": 2}],
    }
]


def _truncate_pixels(ds: Any) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _undecodable_codec(ds: Any) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 32])
    ds["PixelData"].VR = "OB"


# Each kind of broken series, and the words its failure must carry.
FAULTS: dict[str, tuple[Callable[[Any], None], str]] = {
    "truncated": (_truncate_pixels, "cannot prepare the images (instance 2 of 3"),
    "codec": (_undecodable_codec, "cannot prepare the images (instance 2 of 3"),
    # (A tiny image is no bad input any more: like the reference, the engine upscales images
    # under one patch, inference/engine/transforms.py.)
}


def _damage_stored(settings: Any, engine: Any, sop_instance_uid: str, fault: Callable[[Any], None]) -> None:
    from dicom_node.models import Instance

    with Session(engine) as s:
        relpath = s.exec(select(Instance.relpath).where(Instance.sop_instance_uid == sop_instance_uid)).one()
    path = Storage(settings.storage.path, 0).path(relpath)
    ds = dcmread(path)
    fault(ds)
    ds.save_as(path, enforce_file_format=True)


def _study_with_broken_series(folder: Path, fault: Callable[[Any], None]) -> list[Path]:
    good = ct_study(folder / "good", slices=3)
    study_uid = dcmread(good[0], stop_before_pixels=True).StudyInstanceUID
    series_uid = generate_uid()
    bad = []
    for i, p in enumerate(ct_study(folder / "bad", slices=3)):
        ds = dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SeriesNumber, ds.SeriesDescription = 7, "Broken recon"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if i == 1:
            fault(ds)
        out = folder / f"bad-{i}.dcm"
        ds.save_as(out, enforce_file_format=True)
        bad.append(out)
    return good + bad


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> Any:
    settings = load_config(write_config(tmp_path, db_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}"))
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    yield settings, engine
    engine.dispose()


@pytest.fixture(scope="module")
def tiny() -> Any:
    from inference.engine import load_engine

    return load_engine("tiny", device="cpu")


def _context(settings: Any, tiny: Any) -> WorkerContext:
    ctx = WorkerContext(settings, device="cpu")
    ctx._engine = tiny  # the model a worker keeps warm, loaded once for the module
    return ctx


def _jobs(engine: Any) -> list[Job]:
    with Session(engine) as s:
        return list(s.exec(select(Job).order_by(Job.id)))


def _run_all(settings: Any, engine: Any, ctx: WorkerContext) -> dict[int, str]:
    storage = Storage(settings.storage.path, 0)
    return {
        j.id: execute_job(engine, storage, j.id, ctx.run_pipeline, ctx.destinations)
        for j in _jobs(engine)
        if j.state == PLANNED
    }


@pytest.mark.parametrize(
    ("db_url", "fault"),
    [*[("sqlite", f) for f in FAULTS], pytest.param("postgres", "truncated", marks=pytest.mark.postgres)],
    indirect=["db_url"],
)
def test_a_broken_series_fails_alone_named_and_is_retried_alone(
    env: Any, tiny: Any, tmp_path: Path, fault: str
) -> None:
    settings, engine = env
    breaker, words = FAULTS[fault]
    if fault == "truncated":
        # The node refuses such an instance at the door (0xA900, issue 15): it reaches a job only
        # as a stored file damaged afterwards. Store it whole, then damage it on disk.
        paths = _study_with_broken_series(tmp_path / "study", lambda ds: None)
        ingest(settings, paths)
        _damage_stored(settings, engine, dcmread(paths[-2], stop_before_pixels=True).SOPInstanceUID, breaker)
    else:
        ingest(settings, _study_with_broken_series(tmp_path / "study", breaker))
    (event,) = complete_all(engine, settings)
    planner = Planner(engine, parse_rules(RULES), publisher=None)
    plan = planner.plan_revision(event.study_instance_uid, event.revision)
    assert len(plan.job_ids) == 2  # one job per series
    ctx = _context(settings, tiny)
    ran = _run_all(settings, engine, ctx)
    assert sorted(ran.values()) == [RAN_DONE, RAN_FAILED]
    good, bad = sorted(_jobs(engine), key=lambda j: j.state)
    assert (good.state, bad.state) == (DONE, FAILED)
    with Session(engine) as s:
        assert s.exec(select(JobOutput).where(JobOutput.job_id == good.id)).all()
    error = bad.error or ""
    assert error.startswith('series 7 "Broken recon": '), error
    assert words in error, error
    assert "Traceback" not in error and "internal error" not in error
    assert "InstanceNumber 2" in error, error

    # Retry re-runs only the failed job; re-planning adds nothing.
    assert retry_jobs(engine, all_failed=True) == [bad.id]
    assert [j.id for j in _jobs(engine) if j.state == PLANNED] == [bad.id]
    assert _run_all(settings, engine, ctx) == {bad.id: RAN_FAILED}
    assert not planner.plan_revision(event.study_instance_uid, event.revision).new_job_ids
    with Session(engine) as s:
        assert len(s.exec(select(JobOutput)).all()) == 1  # the good series' SR, once


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_bug_is_a_crash_retried_counted_and_internal(
    env: Any, tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings, engine = env
    ingest(settings, ct_study(tmp_path / "ct", slices=2))
    (event,) = complete_all(engine, settings)
    Planner(engine, parse_rules(RULES), publisher=None).plan_revision(event.study_instance_uid, event.revision)
    import inference.preprocess as preprocess

    def broadcast_bug(frame: np.ndarray, window: Any, function: str = "LINEAR") -> np.ndarray:
        return (frame + np.zeros(frame.shape[0] + 1)).astype(np.uint8)  # ValueError: shapes differ

    monkeypatch.setattr(preprocess, "apply_window", broadcast_bug)
    ctx = _context(settings, tiny)
    (job,) = _jobs(engine)
    with caplog.at_level(logging.ERROR, logger="dicom_node.jobs.runner"):
        for attempt in range(1, job.max_attempts + 1):
            ran = _run_all(settings, engine, ctx)
            (job,) = _jobs(engine)
            assert job.crashes == attempt
            if attempt < job.max_attempts:
                assert ran == {job.id: RETRYING} and job.state == PLANNED
                assert "retrying" in (job.error or "")
    assert ran == {job.id: RAN_FAILED} and job.state == FAILED
    assert (job.error or "").startswith("internal error (ValueError)"), job.error
    assert "broadcast" not in (job.error or "")  # no raw exception text as the reason
    crashed = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crashed) == job.max_attempts and all(r.exc_info for r in crashed)
    metrics = {m.name: m for m in JobCollector(engine).collect()}
    assert metrics["unimedvl_job_crashes"].samples[0].value == job.max_attempts
