"""Planning, publishing, claiming and sweeping on the real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlmodel import Session, select

from dicom_node.config import load_config
from dicom_node.db import init_db, make_engine
from dicom_node.jobs import (
    DONE,
    FAILED,
    PLANNED,
    QUEUED,
    RUNNING,
    Job,
    JobSettings,
    Planner,
    Publisher,
    StudyPlanRecord,
    jobs_status,
    retry_jobs,
    study_plan,
)
from dicom_node.jobs.runner import claim, complete, fail, renew
from dicom_node.jobs.settings import utcnow
from dicom_node.routing import parse_rules
from dicom_node.storage import Storage
from tests.jobs.conftest import (
    FAST_RULES,
    complete_all,
    cr_study,
    ct_study,
    ingest,
    with_extra_series,
    write_config,
)


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> Any:
    settings = load_config(write_config(tmp_path, db_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}"))
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    yield settings, engine
    engine.dispose()


def _jobs(engine: Any) -> list[Job]:
    with Session(engine) as s:
        return list(s.exec(select(Job).order_by(Job.id)))


def test_replanning_never_duplicates_and_unmatched_series_are_recorded(env: Any, tmp_path: Path) -> None:
    settings, engine = env
    cr = with_extra_series(cr_study(tmp_path / "cr"), tmp_path / "cr", "OT")
    ct = ct_study(tmp_path / "ct")
    ot_only = with_extra_series(cr_study(tmp_path / "ot", seed=3), tmp_path / "ot", "OT")[1:]
    ingest(settings, cr + ct + ot_only)
    events = complete_all(engine, settings)
    assert len(events) == 3

    planner = Planner(engine, parse_rules(FAST_RULES), publisher=None)
    results = [planner.plan_revision(e.study_instance_uid, e.revision, e.series_uids) for e in events]
    jobs = _jobs(engine)
    assert sorted(j.rule for j in jobs) == ["cr-report", "ct-report"]
    assert all(j.state == PLANNED and j.attempts == 0 for j in jobs)
    assert sum(len(r.new_job_ids) for r in results) == 2

    # The completion event can be delivered again (at-least-once) and the operator can re-plan.
    again = [planner.plan_revision(e.study_instance_uid, e.revision, e.series_uids) for e in events]
    assert [j.id for j in _jobs(engine)] == [j.id for j in jobs]
    assert all(not r.new_job_ids for r in again)
    assert sorted(sum((r.job_ids for r in again), [])) == sorted(j.id for j in jobs)

    ot_series = {str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in (cr[1], ot_only[0])}
    with Session(engine) as s:
        plans = {p.study_instance_uid: p for p in s.exec(select(StudyPlanRecord))}
    assert len(plans) == 3  # one record per revision, re-planning updated it in place
    by_study = {e.study_instance_uid: e for e in events}
    cr_uid = next(u for u, e in by_study.items() if len(e.series_uids) == 2)
    ot_uid = next(u for u, p in plans.items() if p.tasks_planned == 0)
    assert set(plans[cr_uid].unmatched_series) < ot_series and plans[cr_uid].tasks_planned == 1
    assert plans[ot_uid].unmatched_series == list(by_study[ot_uid].series_uids)
    assert "no routing rule matched" in (plans[ot_uid].note or "")
    status = jobs_status(engine)
    assert {u["study_instance_uid"] for u in status["unmatched"]} == {cr_uid, ot_uid}
    assert study_plan(engine, ot_uid)[0]["unmatched_series"] == list(by_study[ot_uid].series_uids)

    # Another model version is another job: the key covers the model.
    other = Planner(engine, parse_rules(FAST_RULES), publisher=None, model="/models/other-checkpoint")
    assert len(other.plan_revision(events[0].study_instance_uid, events[0].revision).new_job_ids) == 1


def test_publish_claim_lease_sweep_and_give_up(env: Any, tmp_path: Path) -> None:
    settings, engine = env
    ingest(settings, cr_study(tmp_path / "cr"))
    (event,) = complete_all(engine, settings)
    policy = JobSettings(max_attempts=2, lease_seconds=30, planned_grace_seconds=0)

    # Crash between commit and publish: the job is committed "planned", no message exists.
    Planner(engine, parse_rules(FAST_RULES), publisher=None, jobs=policy).plan_revision(
        event.study_instance_uid, event.revision
    )
    (job,) = _jobs(engine)
    assert job.state == PLANNED and job.published_at is None

    publisher = Publisher(settings.broker.url)
    try:
        planner = Planner(engine, parse_rules(FAST_RULES), publisher, jobs=policy)
        assert planner.sweep().published == 1
        (job,) = _jobs(engine)
        assert job.state == QUEUED and job.published_at is not None

        t0 = utcnow()
        c1 = claim(engine, job.id, "host-a:1", now=t0)
        assert c1 is not None and c1.job.attempts == 1 and c1.job.state == RUNNING
        # A duplicate delivery while the lease is valid is ignored; renewing works for the holder only.
        assert claim(engine, job.id, "host-b:2", now=t0 + timedelta(seconds=1)) is None
        assert renew(engine, c1, now=t0 + timedelta(seconds=2))

        # The worker dies: no renewals. After the lease the sweeper re-queues and re-publishes.
        r = planner.sweep(now=t0 + timedelta(seconds=40))
        assert (r.lease_expired, r.published) == (1, 1)
        (job,) = _jobs(engine)
        assert job.state == QUEUED and job.attempts == 1
        assert not renew(engine, c1)  # the old holder learns it lost the claim

        c2 = claim(engine, job.id, "host-b:2", now=t0 + timedelta(seconds=41))
        assert c2 is not None and c2.job.attempts == 2
        # The first worker's late result is refused: its claim token is stale.
        assert complete(engine, Storage(settings.storage.path), c1, [], ["pacs"]) is None
        assert not fail(engine, c1, "late")

        r = planner.sweep(now=t0 + timedelta(seconds=200))
        assert r.gave_up == 1
        (job,) = _jobs(engine)
        assert job.state == FAILED and job.attempts == 2
        assert "worker stopped" in (job.error or "") and "2 attempt" in (job.error or "")

        # Retry keeps the history and allows another max_attempts claims.
        assert retry_jobs(engine, all_failed=True, jobs=policy) == [job.id]
        (job,) = _jobs(engine)
        assert (job.state, job.attempts, job.max_attempts, job.retries) == (PLANNED, 2, 4, 1)
        assert retry_jobs(engine, ids=[job.id]) == []  # only failed jobs move
        c3 = claim(engine, job.id, "host-c:3")
        assert c3 is not None
        assert complete(engine, Storage(settings.storage.path), c3, [], ["pacs"]) == []
        (job,) = _jobs(engine)
        assert job.state == DONE and job.attempts == 3
        assert claim(engine, job.id, "host-d:4") is None  # done stays done
    finally:
        publisher.close()


def test_retry_needs_a_selection(env: Any) -> None:
    _, engine = env
    with pytest.raises(ValueError):
        retry_jobs(engine)
