"""/readyz and its Prometheus gauges tell the truth: a PACS down, no worker, an old queue, a full
disk, an unreachable broker or database each degrade it with a reason; recovery clears it."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dicom_node.config import Settings
from dicom_node.db import init_db, make_engine
from tests.conftest import free_port, require_tool
from tests.console.conftest import make_app


def _settings(tmp_path: Path, **over: Any) -> Settings:
    base: dict[str, Any] = {
        "storage": {"path": str(tmp_path / "storage"), "min_free_bytes": 0},
        "database": {"url": f"sqlite:///{tmp_path / 'index.db'}"},
        "broker": {"url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"},
    }
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return Settings(**base)


def _wait(predicate: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.orthanc
@pytest.mark.slow
def test_readyz_degrades_when_the_pacs_stops_and_recovers(tmp_path: Path) -> None:
    from benchmarks.peers import OrthancServer
    from dicom_node.export import Exporter
    from dicom_node.export.outbox import enqueue
    from dicom_node.storage import Storage
    from tests.export.objects import ct_slices

    require_tool("Orthanc")
    pacs = OrthancServer(tmp_path / "orthanc", dicomweb=False).start()
    failing_after = 2.0
    settings = _settings(
        tmp_path,
        destinations=[
            {"name": "pacs", "kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
        export={"max_attempts": 1000, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5, "poll_seconds": 0.1},
        health={"destination_failing_seconds": failing_after},
    )
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    storage = Storage(settings.storage.path)
    stop = threading.Event()
    exporter = threading.Thread(target=Exporter(settings, engine, storage).run_forever, args=(stop,), daemon=True)
    exporter.start()
    client = TestClient(make_app(settings))
    slices = ct_slices(tmp_path / "ct", 2)
    try:
        enqueue(engine, storage, slices[0], ["pacs"])
        _wait(lambda: client.get("/readyz").json()["destinations"]["pacs"]["last_delivered_at"], 30, "a delivery")
        assert client.get("/readyz").status_code == 200

        pacs.kill()  # the PACS goes away; a new result waits for it
        down_at = time.monotonic()
        enqueue(engine, storage, slices[1], ["pacs"])
        _wait(lambda: client.get("/readyz").status_code == 503, failing_after + 15, "/readyz degraded")
        waited = time.monotonic() - down_at
        assert waited >= failing_after  # not before the configured time
        body = client.get("/readyz").json()
        (reason,) = [r for r in body["reasons"] if r.startswith("destination pacs")]
        assert "undelivered" in reason and "last error" in reason, reason
        assert body["checks"]["destinations"] == "failing" and body["destinations"]["pacs"]["state"] == "failing"
        metrics = client.get("/metrics").text
        assert _metric(metrics, "unimedvl_ready") == 0
        assert _metric(metrics, 'unimedvl_destination_failing_seconds{destination="pacs"}') >= failing_after

        pacs.restart()
        _wait(lambda: client.get("/readyz").status_code == 200, 60, "/readyz to recover")
        assert _metric(client.get("/metrics").text, "unimedvl_ready") == 1
    finally:
        stop.set()
        exporter.join(30)
        pacs.kill()
        engine.dispose()


def _planned_job(engine: Any, created: datetime) -> None:
    from sqlmodel import Session

    from dicom_node.jobs.models import Job

    with Session(engine) as s:
        s.add(
            Job(
                idempotency_key="k" * 64,
                study_instance_uid="1.2.3",
                revision=1,
                rule="r",
                kind="report",
                model_version="tiny",
                queue="unimedvl.understanding",
                created_at=created,
                updated_at=created,
            )
        )
        s.commit()


@pytest.mark.parametrize(
    ("case", "check", "words"),
    [
        ("disk", "storage", "under the floor"),
        ("broker", "broker", "broker cannot be reached"),
        ("database", "database", "database cannot be reached"),
        ("queue", "queue", "has waited"),
        ("workers", "workers", "no worker has heartbeated"),
    ],
)
def test_each_readiness_check_degrades_with_a_reason(tmp_path: Path, case: str, check: str, words: str) -> None:
    over: dict[str, Any] = {"health": {"queued_age_seconds": 30, "worker_silence_seconds": 60}}
    if case == "disk":
        over["storage"] = {"min_free_bytes": 2**62}
    if case == "broker":
        over["broker"] = {"url": f"amqp://guest:guest@127.0.0.1:{free_port()}//"}  # nothing listens there
    settings = _settings(tmp_path, **over)
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    client = TestClient(
        make_app(
            settings,
        )
    )
    assert client.get("/readyz").status_code == (503 if case in ("disk", "broker") else 200)
    now = datetime.now(UTC)
    if case in ("queue", "workers"):
        _planned_job(engine, now - timedelta(seconds=120 if case == "workers" else 45))
    if case == "database":
        (tmp_path / "index.db").unlink()
        (tmp_path / "index.db").mkdir()  # the file is gone and cannot be created: unreachable
        engine.dispose()
        client.app.state.read_engine.dispose()
        client.app.state.readiness.engine.dispose()
    r = client.get("/readyz")
    assert r.status_code == 503, r.json()
    body = r.json()
    assert body["checks"][check] == "failing" and any(words in x for x in body["reasons"]), body
    ok_checks = [k for k, v in body["checks"].items() if v == "ok"]
    assert check not in ok_checks
    metrics = client.get("/metrics").text
    assert _metric(metrics, "unimedvl_ready") == 0
    assert f'unimedvl_ready_check{{check="{check}"}} 0.0' in metrics
    engine.dispose()


def test_monitoring_files_use_metrics_the_gateway_serves(scenario: Any) -> None:
    """deploy/monitoring: every metric the alert rules and the Grafana dashboard query exists."""
    import json
    import re

    import yaml

    from tests.conftest import REPO

    client = TestClient(make_app(scenario.settings))
    text = client.get("/metrics").text

    def base(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum|created)$", "", name)

    served = {base(m) for m in re.findall(r"^(?:# TYPE )?(unimedvl_[a-z_]+)", text, flags=re.M)}
    mon = REPO / "deploy" / "monitoring"
    rules = yaml.safe_load((mon / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((mon / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {base(m) for e in exprs for m in re.findall(r"unimedvl_[a-z_]+", e)}
    assert len(used) >= 12 and used <= served, sorted(used - served)
