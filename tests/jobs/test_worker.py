"""Real worker processes on both brokers: end to end, crashes, broker restarts, bad input, retry.

Studies arrive through the node (C-STORE over pynetdicom or its ingest path), complete, are
planned into jobs, and a real `python -m dicom_node.jobs.worker` process runs them with the tiny
model; results must be in storage and in the outbox exactly once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE
from sqlmodel import Session, select

from dicom_node.config import load_config
from dicom_node.db import init_db, make_engine
from dicom_node.export.models import OutboxRow
from dicom_node.jobs import DONE, FAILED, PLANNED, RUNNING, Job, JobOutput, JobSettings, Planner, Publisher, retry_jobs
from dicom_node.jobs.service import JobService
from dicom_node.jobs.settings import as_utc
from dicom_node.routing import parse_rules
from dicom_node.storage import Storage
from tests.conftest import REPO
from tests.jobs.conftest import (
    BROKER_DB_SETUPS,
    FAST_RULES,
    WorkerProcess,
    complete_all,
    cr_study,
    ct_study,
    ingest,
    rabbitmq_app_stopped,
    setup_settings,
    slow_rules,
    undecodable_cr,
    wait_for,
    with_extra_series,
    write_config,
)


def _jobs(engine: Any) -> list[Job]:
    with Session(engine) as s:
        return list(s.exec(select(Job).order_by(Job.id)))


def _outputs(engine: Any, job_id: int) -> list[JobOutput]:
    with Session(engine) as s:
        return list(s.exec(select(JobOutput).where(JobOutput.job_id == job_id)))


def _outbox(engine: Any, job_id: int) -> list[OutboxRow]:
    with Session(engine) as s:
        return list(s.exec(select(OutboxRow).where(OutboxRow.job_id == job_id)))


def _assert_outputs_once(engine: Any, storage: Storage, job: Job) -> list[JobOutput]:
    """Every output recorded once, stored intact, and queued once per destination."""
    outs = _outputs(engine, job.id or 0)
    assert outs, f"job {job.id} has no outputs"
    sops = [o.sop_instance_uid for o in outs]
    assert len(sops) == len(set(sops))
    rows = _outbox(engine, job.id or 0)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sops)  # one destination: one row each
    for o in outs:
        path = storage.path(o.relpath)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == o.sha256
        assert str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) == o.sop_instance_uid
        assert o.outbox_ids and all(r.relpath == o.relpath for r in rows if r.id in o.outbox_ids)
    return outs


def _c_store(port: int, paths: list[Path]) -> None:
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title="MODALITY")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="UNIMEDVL")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
    finally:
        assoc.release()


def _diag(engine: Any, *workers: WorkerProcess | Path) -> Callable[[], str]:
    def tail(w: WorkerProcess | Path) -> str:
        return w.tail() if isinstance(w, WorkerProcess) else w.read_text(errors="replace")[-4000:]

    def text() -> str:
        jobs = [(j.id, j.kind, j.state, j.attempts, j.error) for j in _jobs(engine)]
        return f"jobs: {jobs}\n" + "\n".join(tail(w) for w in workers)

    return text


def test_node_to_worker_end_to_end_with_a_bad_study_and_retry(
    broker_url: str, tmp_path: Path, start_worker: Callable[..., WorkerProcess], orthanc: Any
) -> None:
    """C-STORE -> completion -> plan -> worker -> storage + outbox -> Orthanc; undecodable pixels fail alone.

    On RabbitMQ the worker is the plain `celery -A dicom_node.jobs.celery_app worker` command.
    """
    from dicom_node.export import DONE as SENT
    from dicom_node.export import Exporter
    from dicom_node.node import Node

    pacs = orthanc
    settings = load_config(
        write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", broker_url, pacs=(pacs.aet, pacs.dicom_port))
    )
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    storage = Storage(settings.storage.path)
    embedded = not broker_url.startswith("amqp")
    worker_log = open(tmp_path / "embedded-worker.log", "ab")  # noqa: SIM115 - closed in finally
    # What `unimedvl serve` runs: planner + sweeper + an embedded worker process it supervises.
    service = JobService(
        settings,
        engine,
        parse_rules(FAST_RULES),
        jobs=JobSettings(lease_seconds=20, sweep_interval_seconds=0.5, planned_grace_seconds=1),
        embedded_worker=embedded,
        worker_env={"PYTHONPATH": str(REPO)},
        worker_log=worker_log,
    )
    publisher = service.publisher
    node = Node(settings)
    assert node.monitor is not None
    service.attach(node.monitor)
    node.start()
    service.start()
    worker = None if embedded else start_worker(settings, celery_cli=True)
    logs = [worker.log if worker else tmp_path / "embedded-worker.log"]
    try:
        cr = with_extra_series(cr_study(tmp_path / "cr"), tmp_path / "cr", "OT")
        _c_store(node.port, cr + ct_study(tmp_path / "ct") + undecodable_cr(tmp_path / "bad"))
        finished = wait_for(
            lambda: len(js := _jobs(engine)) == 3 and all(j.state in (DONE, FAILED) for j in js) and js,
            150,
            "three jobs to finish",
            _diag(engine, *logs),
        )
        done = [j for j in finished if j.state == DONE]
        failed = [j for j in finished if j.state == FAILED]
        assert sorted(j.rule for j in done) == ["cr-report", "ct-report"], _diag(engine, *logs)()
        for j in done:
            outs = _assert_outputs_once(engine, storage, j)
            assert {o.kind for o in outs} == {"sr"}
            assert j.attempts == 1 and j.model_info and j.model_info["is_demo"] is True
        (bad,) = failed
        assert bad.rule == "cr-report" and bad.attempts == 1
        reason = bad.error or ""
        assert reason and "Traceback" not in reason and "\n" not in reason
        assert any(w in reason.lower() for w in ("decode", "pixel", "jpeg")), reason
        assert _outputs(engine, bad.id or 0) == [] and _outbox(engine, bad.id or 0) == []

        before = {j.id: len(_outputs(engine, j.id or 0)) for j in done}
        # Retry re-runs it: the same bad input fails again, with its attempts counted.
        assert retry_jobs(engine, ids=[bad.id or 0], publisher=publisher) == [bad.id]
        again = wait_for(
            lambda: (j := next(x for x in _jobs(engine) if x.id == bad.id)).state == FAILED and j.attempts == 2 and j,
            60,
            "the retried job to fail again",
            _diag(engine, *logs),
        )
        assert again.retries == 1 and again.error == reason
        assert {j.id: len(_outputs(engine, j.id or 0)) for j in done} == before  # done jobs untouched

        # Delivery: the exporter sends the outbox to the PACS, which then holds every result object.
        exporter = Exporter(settings, engine, storage)
        wait_for(
            lambda: (
                exporter.run_once() is not None
                and all(r.state == SENT for j in done for r in _outbox(engine, j.id or 0))
            ),
            60,
            "delivery to Orthanc",
        )
        for j in done:
            for o in _outputs(engine, j.id or 0):
                found = httpx.post(f"{pacs.url}/tools/lookup", content=o.sop_instance_uid, timeout=10).json()
                assert [f["Type"] for f in found] == ["Instance"], o.sop_instance_uid
    finally:
        if worker is not None:
            worker.stop()
        service.stop(timeout=15)
        node.stop(grace_seconds=2)
        worker_log.close()
        engine.dispose()


def _lease_renewed(job: Job, running: Job) -> bool:
    """True once the running job's lease was extended; a job that ended first makes the test moot."""
    assert job.state == RUNNING and job.lease_until is not None, f"the job ended before a renewal: {job.state}"
    return as_utc(job.lease_until) > as_utc(running.lease_until)


@pytest.mark.parametrize("setup", BROKER_DB_SETUPS)
def test_worker_killed_mid_task_outputs_exactly_once(
    setup: tuple[str, str], request: pytest.FixtureRequest, tmp_path: Path, start_worker: Any
) -> None:
    settings = setup_settings(setup, request, tmp_path)
    engine = make_engine(settings.database.url)
    storage = Storage(settings.storage.path)
    ingest(settings, cr_study(tmp_path / "cr"))
    (event,) = complete_all(engine, settings)
    publisher = Publisher(settings.broker.url)
    planner = Planner(
        engine,
        parse_rules(slow_rules(1000)),  # ~20 s on a 2-core CPU, several seconds on any machine
        publisher,
        jobs=JobSettings(lease_seconds=5, sweep_interval_seconds=0.5, planned_grace_seconds=1, max_attempts=4),
    )
    planner.plan_revision(event.study_instance_uid, event.revision)
    planner.start()
    first = start_worker(settings)
    try:
        running = wait_for(
            lambda: (j := _jobs(engine)[0]).state == RUNNING and j, 90, "the job to start", _diag(engine, first)
        )
        # Mid-task: the worker has renewed its lease (it is past claiming and loading, in the model).
        wait_for(
            lambda: _lease_renewed(_jobs(engine)[0], running),
            90,
            "a lease renewal",
            _diag(engine, first),
        )
        first.kill()
        (job,) = _jobs(engine)
        assert job.state == RUNNING and job.attempts == 1 and job.worker == running.worker
        assert _outputs(engine, job.id or 0) == [] and _outbox(engine, job.id or 0) == []
        # Only the first run had to be long (to be killed inside the model); the re-run just has
        # to finish, so it takes a few steps (the row's parameters are what a run reads).
        with Session(engine) as s:
            row = s.get(Job, job.id)
            assert row is not None
            row.params = {**row.params, "steps": 2}
            s.add(row)
            s.commit()

        second = start_worker(settings)
        done = wait_for(
            lambda: (j := _jobs(engine)[0]).state in (DONE, FAILED) and j, 150, "the re-run", _diag(engine, second)
        )
        assert done.state == DONE, done.error
        # Usually 2; on a starved machine a heartbeat can miss the short test lease once more, and
        # that run's result is then refused (its claim is stale): still exactly one set of outputs.
        assert done.attempts >= 2 and done.worker != running.worker
        outs = _assert_outputs_once(engine, storage, done)
        assert len(outs) == 1 and len(_outbox(engine, done.id or 0)) == 1
        with Session(engine) as s:
            assert len(s.exec(select(OutboxRow)).all()) == 1
        second.stop()
    finally:
        planner.stop()
        publisher.close()
        engine.dispose()


def test_rabbitmq_restart_mid_run_loses_nothing(
    rabbit_vhost: str, tmp_path: Path, start_worker: Callable[[Any], WorkerProcess]
) -> None:
    settings = load_config(write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", rabbit_vhost))
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    storage = Storage(settings.storage.path)
    for i in range(3):
        ingest(settings, cr_study(tmp_path / f"cr{i}", seed=i))
    events = complete_all(engine, settings)
    publisher = Publisher(settings.broker.url)
    planner = Planner(
        engine,
        parse_rules(slow_rules(250)),
        publisher,
        jobs=JobSettings(lease_seconds=10, sweep_interval_seconds=0.5, planned_grace_seconds=1),
    )
    for e in events:
        planner.plan_revision(e.study_instance_uid, e.revision)
    planner.start()
    worker = start_worker(settings)
    try:
        wait_for(lambda: any(j.state == RUNNING for j in _jobs(engine)), 90, "a job to start", _diag(engine, worker))
        with rabbitmq_app_stopped():
            # A study completing while the broker is down: committed, publish fails, kept "planned".
            ingest(settings, cr_study(tmp_path / "late", seed=9))
            (late,) = complete_all(engine, settings)
            result = planner.plan_revision(late.study_instance_uid, late.revision)
            assert result.published == 0 and len(result.new_job_ids) == 1
            late_job = wait_for(
                lambda: (j := _jobs(engine)[-1]).id == result.new_job_ids[0] and j.state == PLANNED and j,
                30,
                "the late job to be kept planned",
                _diag(engine, worker),
            )
            assert late_job.attempts == 0
        jobs = wait_for(
            lambda: len(js := _jobs(engine)) == 4 and all(j.state in (DONE, FAILED) for j in js) and js,
            180,
            "all four jobs to finish after the broker restart",
            _diag(engine, worker),
        )
        assert [j.state for j in jobs] == [DONE] * 4, _diag(engine, worker)()
        for j in jobs:
            assert len(_assert_outputs_once(engine, storage, j)) == 1
        with Session(engine) as s:
            assert len(s.exec(select(OutboxRow)).all()) == 4
    finally:
        worker.stop()
        planner.stop()
        publisher.close()
        engine.dispose()


def test_worker_that_cannot_load_its_model_takes_no_job(
    tmp_path: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    """A misconfigured worker stops and leaves the job queued (no attempt used); a good worker runs it."""
    db_url, broker_url = f"sqlite:///{tmp_path / 'index.db'}", f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    settings = load_config(write_config(tmp_path, db_url, broker_url))
    broken = load_config(write_config(tmp_path, db_url, broker_url, model_path=str(tmp_path / "no-such-model")))
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    ingest(settings, cr_study(tmp_path / "cr"))
    (event,) = complete_all(engine, settings)
    publisher = Publisher(settings.broker.url)
    planner = Planner(engine, parse_rules(FAST_RULES), publisher)
    planner.plan_revision(event.study_instance_uid, event.revision)
    try:
        bad = start_worker(broken)
        wait_for(lambda: bad.proc.poll() is not None, 60, "the broken worker to stop", lambda: bad.tail())
        assert "model cannot be loaded" in bad.tail(20000)
        (job,) = _jobs(engine)
        assert (job.state, job.attempts, job.error) == ("queued", 0, None)

        good = start_worker(settings)
        done = wait_for(
            lambda: (j := _jobs(engine)[0]).state in (DONE, FAILED) and j, 90, "the job to run", _diag(engine, good)
        )
        assert done.state == DONE and done.attempts == 1
        _assert_outputs_once(engine, Storage(settings.storage.path), done)
        good.stop()
    finally:
        publisher.close()
        engine.dispose()
