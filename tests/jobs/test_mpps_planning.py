"""An MPPS completion reaches the planner and the broker without the quiet period, on both
deployments (embedded broker + SQLite, RabbitMQ + PostgreSQL)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from dicom_node.jobs import QUEUED, Job
from dicom_node.jobs.service import JobService
from dicom_node.models import StudyRevision
from dicom_node.node import Node
from tests.jobs.conftest import BROKER_DB_SETUPS, ct_study, setup_settings
from tests.node.conftest import store
from tests.node.test_mpps import _create_ds, _final_ds, _mpps_assoc, _n_create, _n_set


@pytest.mark.parametrize("setup", BROKER_DB_SETUPS)
def test_mpps_completion_is_planned_and_published_without_waiting(
    setup: tuple[str, str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    settings = setup_settings(setup, request, tmp_path)
    slow = {"study_quiet_seconds": 600, "series_quiet_seconds": 600, "force_complete_seconds": 3600}
    settings = settings.model_copy(update={"completion": settings.completion.model_copy(update=slow)})
    datasets = [dcmread(p) for p in ct_study(tmp_path / "in", slices=3)]
    study, series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    node = Node(settings)
    jobs = JobService.from_settings(settings, node.engine)
    jobs.attach(node.monitor)
    node.start()
    jobs.start()
    try:
        mpps_uid = generate_uid()
        assoc = _mpps_assoc(node.port)
        try:
            assert _n_create(assoc, _create_ds(study), mpps_uid) == 0x0000
            assert [s.Status for s in store(node.port, datasets)] == [0] * 3
            listed = {series: [ds.SOPInstanceUID for ds in datasets]}
            assert _n_set(assoc, _final_ds("COMPLETED", listed), mpps_uid) == 0x0000
        finally:
            assoc.release()
        deadline = time.monotonic() + 30
        while True:
            with Session(node.engine) as s:
                queued = s.exec(select(Job).where(Job.study_instance_uid == study, Job.state == QUEUED)).all()
                rev = s.exec(select(StudyRevision)).first()
            if queued:
                break
            assert time.monotonic() < deadline, f"no job published; revision {rev}"
            time.sleep(0.05)
        assert rev is not None and (rev.reason, rev.state) == ("mpps", "complete")
        assert all(j.revision == 1 for j in queued)
    finally:
        jobs.stop()
        node.stop(grace_seconds=2)
