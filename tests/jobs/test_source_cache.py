"""A worker's next job of the same study gets the sources its last job parsed (dicom_node.jobs.source_cache).

Two tasks on one CT series run as two jobs through the worker's own JobIO (LocalIO with its
SourceCache), in-process on a real SQLite index and storage: the second job parses nothing and
delivers the same references; a job that fails puts nothing back, so what it did to its datasets
never reaches the next job; another study's job parses its own files.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from sqlmodel import Session, select

from dicom_node.config import load_config
from dicom_node.db import init_db, make_engine
from dicom_node.jobs import DONE, FAILED, Job, JobOutput, Planner
from dicom_node.jobs.context import WorkerContext
from dicom_node.jobs.runner import RAN_DONE, RAN_FAILED, execute_job
from dicom_node.routing import parse_rules
from inference.pipelines.errors import PipelineError
from tests.jobs.conftest import complete_all, ct_study, ingest, wait_for, write_config

RULES = [
    {
        "name": "ct",
        "match": {"Modality": ["CT"]},
        "tasks": [
            {"kind": "report", "prompt": "Describe.", "slices": "middle", "max_new_tokens": 2},
            {"kind": "vqa", "questions": ["Is there a nodule?"], "slices": "middle", "max_new_tokens": 2},
        ],
    }
]
LOADED = "dicom_node.jobs.runner"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Any, Any, WorkerContext]]:
    settings = load_config(write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", "memory://"))
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    from inference.engine import load_engine

    ctx = WorkerContext(settings, device="cpu")
    ctx._engine = load_engine("tiny", device="cpu")
    yield settings, engine, ctx
    engine.dispose()


def _plan_study(settings: Any, engine: Any, folder: Path) -> list[int]:
    ingest(settings, ct_study(folder, slices=4))
    (event,) = complete_all(engine, settings)
    planner = Planner(engine, parse_rules(RULES), publisher=None)
    return planner.plan_revision(event.study_instance_uid, event.revision).job_ids


def _run(engine: Any, ctx: WorkerContext, job_id: int, run: Any = None) -> str:
    return execute_job(engine, ctx.job_io, job_id, run or ctx.run_pipeline, ctx.destinations)


def _loaded_line(caplog: pytest.LogCaptureFixture, job_id: int) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job_id}: ")]
    assert len(lines) == 1, lines
    return lines[0]


def _evidence(settings: Any, engine: Any, job_id: int) -> set[str]:
    """SOP Instance UIDs the job's stored SR references as evidence."""
    with Session(engine) as s:
        (out,) = s.exec(select(JobOutput).where(JobOutput.job_id == job_id)).all()
    sr = dcmread(Path(settings.storage.path) / out.relpath)
    return {
        str(ref.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def test_the_next_job_of_a_study_parses_nothing_and_references_the_same_sources(
    env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, engine, ctx = env
    first, second = _plan_study(settings, engine, tmp_path / "ct")
    with caplog.at_level(logging.INFO, logger=LOADED):
        assert _run(engine, ctx, first) == RAN_DONE
        assert _run(engine, ctx, second) == RAN_DONE
    assert _loaded_line(caplog, first).endswith("(4 parsed, 0 from the previous job)")
    assert _loaded_line(caplog, second).endswith("(0 parsed, 4 from the previous job)")
    assert _evidence(settings, engine, first) == _evidence(settings, engine, second)

    # Another study's job reads its own files, and only those.
    (third, _) = _plan_study(settings, engine, tmp_path / "other")
    with caplog.at_level(logging.INFO, logger=LOADED):
        assert _run(engine, ctx, third) == RAN_DONE
    assert _loaded_line(caplog, third).endswith("(4 parsed, 0 from the previous job)")
    assert not _evidence(settings, engine, third) & _evidence(settings, engine, first)


def test_a_failed_job_puts_nothing_back(env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings, engine, ctx = env
    first, second = _plan_study(settings, engine, tmp_path / "ct")

    def spoil_then_fail(job: Job, datasets: list[Dataset]) -> Any:
        for ds in datasets:
            ds.PatientName = "SPOILED^BY^A^FAILED^JOB"
        raise PipelineError("this input cannot be used")

    with caplog.at_level(logging.INFO, logger=LOADED):
        assert _run(engine, ctx, first, spoil_then_fail) == RAN_FAILED
        assert _run(engine, ctx, second) == RAN_DONE
    assert _loaded_line(caplog, second).endswith("(4 parsed, 0 from the previous job)")
    with Session(engine) as s:
        states = {j.id: j.state for j in s.exec(select(Job))}
        (out,) = s.exec(select(JobOutput).where(JobOutput.job_id == second)).all()
    assert states == {first: FAILED, second: DONE}
    assert "SPOILED" not in str(dcmread(Path(settings.storage.path) / out.relpath).PatientName)


def test_the_worker_warm_up_runs_the_writers_once_freezes_the_heap_and_stores_nothing(
    env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool child's warm-up pays the writers' first-use cost (imports, highdicom's tables)
    after loading the model, so a worker's first job does not, then exempts what it keeps for
    life from full garbage collections (gc.freeze); nothing reaches storage."""
    settings, _, ctx = env
    frozen = "long-lived objects exempted from full garbage collections"
    try:
        with caplog.at_level(logging.INFO, logger="dicom_node.jobs.context"):
            ctx.warm_up_in_background()
            wait_for(
                lambda: any(frozen in r.getMessage() for r in caplog.records),
                60,
                "the warm-up's log lines",
                lambda: "\n".join(r.getMessage() for r in caplog.records),
            )
        messages = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("result writers warmed up in") for m in messages), messages
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # the rest of this pytest process collects as usual
    assert not any((Path(settings.storage.path) / "objects").rglob("*.dcm"))
