"""Stall signals (dicom_node.jobs.stalls): each kind of stall as a reason, a metric and a status line."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dicom_node.config import load_config
from dicom_node.db import init_db, make_engine
from dicom_node.jobs import Planner
from dicom_node.jobs.metrics import JobCollector
from dicom_node.jobs.runner import claim
from dicom_node.jobs.settings import JobSettings, utcnow
from dicom_node.jobs.stalls import stall_figures, stalls
from dicom_node.routing import parse_rules
from tests.conftest import REPO
from tests.jobs.conftest import FAST_RULES, complete_all, cr_study, ingest, write_config


@pytest.fixture
def one_job(tmp_path: Path):
    cfg = write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", f"sqla+sqlite:///{tmp_path / 'b.db'}")
    cfg.write_text(cfg.read_text() + "[jobs]\nstall_queued_seconds = 60\ntime_limit_seconds = 600\n")
    settings = load_config(cfg)
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    ingest(settings, cr_study(tmp_path / "cr"))
    (event,) = complete_all(engine, settings)
    (job_id,) = Planner(engine, parse_rules(FAST_RULES), None).plan_revision(event.study_instance_uid, 1).job_ids
    yield cfg, settings, engine, job_id
    engine.dispose()


def test_each_kind_of_stall_is_a_reason_and_a_metric(one_job) -> None:
    _cfg, settings, engine, job_id = one_job
    t0 = utcnow()
    assert stalls(engine, settings, now=t0) == []
    # A job nobody takes: waiting past stall_queued_seconds.
    (reason,) = stalls(engine, settings, now=t0 + timedelta(seconds=90))
    assert "oldest waiting job" in reason and "no worker" in reason
    assert stall_figures(engine, now=t0 + timedelta(seconds=90)).oldest_waiting_age == pytest.approx(90, abs=5)

    # A worker that stopped renewing its lease (heartbeat), then a job past its time limit.
    c = claim(engine, job_id, "gpu-host:7", now=t0)
    assert c is not None
    lease = c.job.lease_seconds
    assert stalls(engine, settings, now=t0 + timedelta(seconds=lease / 3)) == []
    (reason,) = stalls(engine, settings, now=t0 + timedelta(seconds=lease * 2))
    assert "stopped renewing its lease" in reason
    reasons = stalls(engine, settings, now=t0 + timedelta(seconds=700))
    assert any("past the time limit of 600 s" in r for r in reasons), reasons
    figures = stall_figures(engine, JobSettings(time_limit_seconds=600), now=t0 + timedelta(seconds=700))
    assert (figures.overrun, figures.stale_heartbeats) == (1, 1) and figures.oldest_waiting_age is None

    registry = CollectorRegistry()
    registry.register(JobCollector(engine))
    text = generate_latest(registry).decode()
    for name in (
        "unimedvl_job_oldest_waiting_age_seconds",
        "unimedvl_worker_heartbeat_age_seconds",
        "unimedvl_jobs_stale_heartbeat",
        "unimedvl_jobs_overrun",
    ):
        assert f"\n{name} " in text, name


def test_status_command_prints_the_stall(one_job) -> None:
    cfg, _settings, engine, job_id = one_job
    with engine.begin() as conn:  # the job was created two minutes ago: past stall_queued_seconds (60)
        conn.exec_driver_sql("UPDATE job SET created_at = ? WHERE id = ?", (utcnow() - timedelta(seconds=120), job_id))
    out = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "status", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=cfg.parent,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stalled:" in out.stdout and "oldest waiting job" in out.stdout, out.stdout
