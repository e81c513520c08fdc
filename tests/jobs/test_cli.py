"""`unimedvl jobs` / `unimedvl worker` commands (registered on a Typer app) and GPU pinning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dicom_node.config import load_config
from dicom_node.db import init_db, make_engine
from dicom_node.jobs import Planner, retry_jobs
from dicom_node.jobs.api import jobs_router
from dicom_node.jobs.cli import register
from dicom_node.jobs.runner import claim, fail
from dicom_node.jobs.worker import pin_device, queues_for
from dicom_node.routing import parse_rules
from tests.jobs.conftest import FAST_RULES, complete_all, cr_study, ingest, write_config


def test_jobs_command_lists_jobs_with_reasons(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", f"sqla+sqlite:///{tmp_path / 'b.db'}")
    settings = load_config(cfg)
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    ingest(settings, cr_study(tmp_path / "cr"))
    (event,) = complete_all(engine, settings)
    (job_id,) = Planner(engine, parse_rules(FAST_RULES), None).plan_revision(event.study_instance_uid, 1).job_ids
    c = claim(engine, job_id, "gpu-host:42")
    assert c is not None and fail(engine, c, "pixel data cannot be decoded")

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["jobs", "--config", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    reason = "pixel data cannot be decoded"
    assert (row["id"], row["state"], row["attempts"], row["error"]) == (job_id, "failed", 1, reason)
    result = runner.invoke(app, ["jobs", "--config", str(cfg), "--state", "failed"])
    assert result.exit_code == 0 and "failed" in result.output and "decoded" in result.output
    assert retry_jobs(engine, ids=[job_id]) == [job_id]
    result = runner.invoke(app, ["jobs", "--config", str(cfg), "--state", "failed", "--json"])
    assert json.loads(result.output) == []
    result = runner.invoke(app, ["worker", "--help"])
    assert result.exit_code == 0 and "--device" in result.output

    # The same data through the API routes the status server mounts.
    api = FastAPI()
    api.include_router(jobs_router(engine))
    client = TestClient(api)
    assert [j["id"] for j in client.get("/api/jobs").json()] == [job_id]
    assert client.get("/api/jobs", params={"state": "bogus"}).status_code == 422
    assert client.get(f"/api/jobs/{job_id}").json()["retries"] == 1
    assert client.get("/api/jobs/999").status_code == 404
    assert client.post(f"/api/jobs/{job_id}/retry").status_code == 409  # planned, not failed
    c = claim(engine, job_id, "gpu-host:43")
    assert c is not None and fail(engine, c, "again")
    retried = client.post(f"/api/jobs/{job_id}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "planned"
    assert client.get("/api/jobs/status").json()["counts"]["planned"] == 1
    timeline = client.get(f"/api/studies/{event.study_instance_uid}/timeline").json()
    (rev,) = timeline["revisions"]
    assert rev["state"] == "complete" and rev["tasks_planned"] == 1 and rev["received_first"]
    assert [(j["id"], j["attempts"], j["outputs"]) for j in rev["jobs"]] == [(job_id, 2, 0)]
    assert client.get("/api/studies/1.2.3/timeline").status_code == 404
    engine.dispose()


def test_device_pinning_and_queue_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pin_device("cuda:1") == "cuda:0"
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert pin_device("cpu") == "cpu" and pin_device(None) is None
    assert queues_for(["report", "vqa"]) == ["unimedvl.understanding"]
    assert queues_for(None) == ["unimedvl.understanding", "unimedvl.generation"]
    with pytest.raises(ValueError, match="unknown queue"):
        queues_for(["unimedvl.dead"])
