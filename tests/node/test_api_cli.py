"""Status API, CLI commands and the multi-process listener, against real nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from dicom_node.api import create_app
from dicom_node.db import make_engine
from dicom_node.models import Instance
from tests.conftest import REPO, free_port
from tests.node.conftest import make_ct, node_sections, store, write_config


def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not in metrics")


def test_status_api(db_url: str, make_settings: Any, start_node: Any) -> None:
    settings = make_settings(db_url, node={"allowed_calling_aets": ["TESTSCU"]})
    node = start_node(settings)
    study = pydicom.uid.generate_uid()
    first = make_ct(study, instance_number=1)
    assert [s.Status for s in store(node.port, [first, make_ct(study, instance_number=2), first])] == [0, 0, 0]
    store_bad = make_ct()
    del store_bad.StudyInstanceUID
    assert store(node.port, [store_bad])[0].Status == 0xC001
    from tests.node.conftest import associate

    assert associate(node.port, calling="INTRUDER").is_rejected
    deadline = time.monotonic() + 10
    from dicom_node.console.auth import add_user, create_token

    add_user(node.engine, "ops", "ops-password-1", "readonly")
    client = TestClient(create_app(settings, engine=node.engine, active_associations=node.active_associations))
    assert client.get("/api/studies").status_code == 401  # nothing but health and metrics without a login
    client.headers["Authorization"] = f"Bearer {create_token(node.engine, 'ops')}"
    while time.monotonic() < deadline:
        studies = client.get("/api/studies").json()
        if studies and studies[0]["state"] == "complete":
            break
        time.sleep(0.1)

    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok", ready.json()

    (s,) = studies
    assert (s["study_instance_uid"], s["instance_count"], s["state"], s["completion_reason"]) == (
        study,
        2,
        "complete",
        "quiet",
    )
    assert "patient_id" not in json.dumps(studies).lower()
    detail = client.get(f"/api/studies/{s['id']}").json()
    assert len(detail["series"]) == 2 and detail["duplicates"] == 1
    assert detail["revisions"][0]["notified_at"] is not None
    assert client.get("/api/studies/999999").status_code == 404

    m = client.get("/metrics").text
    assert _metric(m, "unimedvl_instances_received_total") == 2
    assert _metric(m, "unimedvl_bytes_received_total") > 0
    assert _metric(m, "unimedvl_duplicates_total") == 1
    assert _metric(m, "unimedvl_rejections_total", '{reason="missing_uid",stage="store"}') == 1
    assert _metric(m, "unimedvl_rejections_total", '{reason="calling_ae_not_allowed",stage="association"}') == 1
    assert _metric(m, "unimedvl_active_associations") == 0
    assert _metric(m, "unimedvl_study_completion_latency_seconds_count") >= 1

    rej = client.get("/api/rejections").json()
    assert {r["reason"] for r in rej} == {"missing_uid", "calling_ae_not_allowed"}
    assert client.get("/api/duplicates").json()["duplicates_total"] == 1
    page = client.get("/studies")  # a read-only role does not see patient identifiers
    assert page.status_code == 200 and study in page.text and "Test^Patient" not in page.text


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )


def test_serve_status_and_studies_commands(tmp_path: Path) -> None:
    """`unimedvl serve` in the foreground: DICOM + API; SIGTERM stops it cleanly; status/studies read the DB."""
    port, http_port = free_port(), free_port()
    sections = node_sections(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", port=port)
    sections["http"] = {"bind": f"127.0.0.1:{http_port}"}
    # The study stays incomplete while the service runs: this test is about start, API, CLI and a
    # clean stop, not about a model run (a job started by then would keep the stop waiting on it).
    sections["completion"].update(study_quiet_seconds=600, series_quiet_seconds=600, force_complete_seconds=3600)
    cfg = write_config(tmp_path / "unimedvl.toml", **sections)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.3)
        api = f"http://127.0.0.1:{http_port}/api/studies"
        assert httpx.get(api, timeout=5).status_code == 401
        # a token of the admin `serve` created (before the study: stop while no job has started yet)
        token = _cli("users", "token", "admin", "--config", str(cfg), cwd=tmp_path)
        assert token.returncode == 0, token.stderr
        study = pydicom.uid.generate_uid()
        assert [s.Status for s in store(port, [make_ct(study, instance_number=i) for i in range(3)])] == [0] * 3
        studies = httpx.get(api, timeout=5, headers={"Authorization": f"Bearer {token.stdout.strip()}"}).json()
        assert studies[0]["instance_count"] == 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait(10)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, err[-2000:]
    assert "node stopped" in err
    assert "user 'admin' (admin) created with password" in err  # the first-run step, printed once
    assert "Test^Patient" not in err and "PAT-1" not in err  # no patient data in logs

    out = _cli("studies", "--config", str(cfg), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["study_instance_uid"] == study
    out = _cli("status", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Recent studies" in out.stdout and "instances" in out.stdout and "Duplicates" in out.stdout


def test_multiple_listener_processes(tmp_path: Path, node_process: Any) -> None:
    """[node] listeners = 2: two processes on one port (SO_REUSEPORT) feeding one index."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    url = f"sqlite:///{tmp_path / 'index.db'}"
    cfg = write_config(tmp_path / "unimedvl.toml", **node_sections(tmp_path, url, port=port, node={"listeners": 2}))
    node = node_process(cfg, port)
    log_path = tmp_path / "node.log"
    deadline = time.monotonic() + 60
    while "node started" not in log_path.read_text():  # the first listener answers before the second is up
        assert time.monotonic() < deadline
        time.sleep(0.2)
    study = pydicom.uid.generate_uid()
    batches = [[make_ct(study, instance_number=10 * b + i) for i in range(5)] for b in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: store(port, b), batches))
    assert all(s.Status == 0 for r in results for s in r)
    engine = make_engine(url)
    with Session(engine) as s:
        rows = s.exec(select(Instance)).all()
    engine.dispose()
    assert len(rows) == 30
    log = log_path.read_text()
    assert len(set(re.findall(r"pid=(\d+) msg=listening", log))) == 2
    assert node.stop() == 0
