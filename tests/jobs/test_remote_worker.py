"""Workers without a shared disk (issue 19): the node serves stored instances over WADO-RS and
takes job outputs by upload (dicom_node.dicomweb, dicom_node.jobs.uploads); a worker with
`[worker] node_url` (dicom_node.jobs.remote) uses them instead of a storage path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from dicom_node.config import load_config
from dicom_node.db import init_db, make_engine
from dicom_node.export.models import OutboxRow
from dicom_node.jobs import DONE, FAILED, RUNNING, Job, JobOutput, Planner
from dicom_node.jobs.remote import RemoteIO, multipart_boundary
from dicom_node.jobs.runner import Output, claim, source_rows
from dicom_node.jobs.settings import as_utc
from dicom_node.jobs.source_cache import SourceCache
from dicom_node.routing import parse_rules
from tests.conftest import REPO, free_port
from tests.jobs.conftest import (
    FAST_RULES,
    complete_all,
    cr_study,
    ingest,
    slow_rules,
    wait_for,
    write_config,
)


@dataclass
class NodeAPI:
    settings: Any
    engine: Any
    client: Any  # starlette TestClient (an httpx.Client)
    worker_token: str
    readonly_token: str
    job: Job
    study_uid: str
    series_uid: str


@pytest.fixture
def node_api(tmp_path: Path) -> Iterator[NodeAPI]:
    """A node's HTTP app on SQLite with one CR study and its planned job; tokens for a worker and a
    read-only user (not in console.phi_roles)."""
    from starlette.testclient import TestClient

    from dicom_node.api import create_app
    from dicom_node.console.auth import add_user, create_token

    settings = load_config(write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", "memory://"))
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    (cr,) = cr_study(tmp_path / "cr")
    ingest(settings, [cr])
    (event,) = complete_all(engine, settings)
    Planner(engine, parse_rules(FAST_RULES), None).plan_revision(event.study_instance_uid, event.revision)
    with Session(engine) as s:
        (job,) = s.exec(select(Job)).all()
    add_user(engine, "gpu1", "worker-password-1", "worker")
    add_user(engine, "viewer", "viewer-password-1", "readonly")
    ds = dcmread(cr, stop_before_pixels=True)
    with TestClient(create_app(settings, engine=engine)) as client:
        yield NodeAPI(
            settings,
            engine,
            client,
            create_token(engine, "gpu1"),
            create_token(engine, "viewer"),
            job,
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
        )
    engine.dispose()


def _parts(r: httpx.Response) -> list[bytes]:
    from python_multipart.multipart import MultipartParser

    parts: list[bytes] = []
    cur: list[bytes] = []
    parser = MultipartParser(
        multipart_boundary(r.headers["content-type"]),
        {
            "on_part_begin": lambda: cur.clear(),
            "on_part_data": lambda d, a, b: cur.append(d[a:b]),
            "on_part_end": lambda: parts.append(b"".join(cur)),
        },
    )
    parser.write(r.content)
    parser.finalize()
    return parts


def _result_object(source: Path) -> bytes:
    """A Part 10 object standing for a model output (a new instance in a new series)."""
    ds = dcmread(source)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _upload(api: NodeAPI, token: str, data: bytes, *, bearer: str | None = None, sha: str | None = None) -> Any:
    result = {
        "summary": "one object",
        "model_info": {"model_name": "tiny"},
        "outputs": [
            {"kind": "sc", "source_series_uid": api.series_uid, "sha256": sha or hashlib.sha256(data).hexdigest()}
        ],
    }
    return api.client.post(
        f"/api/jobs/{api.job.id}/outputs",
        headers={"Authorization": f"Bearer {bearer or api.worker_token}"},
        data={"claim_token": token, "result": json.dumps(result)},
        files=[("object", ("0.dcm", data, "application/dicom"))],
    )


def test_node_serves_stored_bytes_and_records_an_upload_once(node_api: NodeAPI, tmp_path: Path) -> None:
    """WADO-RS returns the stored bytes (sha256 as indexed); the bad cases get their status and a
    sentence: wrong token 401, other routes 403 for a worker token, no PHI role 403, unknown
    series 404, a stale claim's upload 409; a retried upload of the recording claim records nothing twice."""
    api = node_api
    auth = {"Authorization": f"Bearer {api.worker_token}"}
    url = f"/dicomweb/studies/{api.study_uid}/series/{api.series_uid}"

    r = api.client.get(
        url, headers={**auth, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    (part,) = _parts(r)
    (row,) = source_rows(api.engine, api.job)
    assert hashlib.sha256(part).hexdigest() == row.sha256
    assert api.client.get(f"/dicomweb/studies/{api.study_uid}", headers=auth).status_code == 200

    bad = api.client.get(url, headers={"Authorization": "Bearer umv_not-a-token"})
    assert bad.status_code == 401
    unknown = api.client.get(f"/dicomweb/studies/{api.study_uid}/series/1.2.3.4", headers=auth)
    assert unknown.status_code == 404 and unknown.json()["detail"] == "no such series on this node"
    assert api.client.get(url, headers={**auth, "Accept": "application/dicom+json"}).status_code == 406
    viewer = api.client.get(url, headers={"Authorization": f"Bearer {api.readonly_token}"})
    assert viewer.status_code == 403 and "patient data" in viewer.json()["detail"]
    other = api.client.get("/api/jobs", headers=auth)
    assert other.status_code == 403 and "worker token" in other.json()["detail"]
    assert api.client.post(f"/api/jobs/{api.job.id}/retry", headers=auth).status_code == 403

    # Stale claim: the first claim's lease ran out and a second worker claimed the job.
    first = claim(api.engine, api.job.id or 0, "gpu-a:1")
    assert first is not None
    later = as_utc(first.job.lease_until) + timedelta(seconds=1)  # type: ignore[operator]
    second = claim(api.engine, api.job.id or 0, "gpu-b:1", now=later)
    assert second is not None
    data = _result_object(tmp_path / "cr" / os.listdir(tmp_path / "cr")[0])
    stale = _upload(api, first.token, data)
    assert stale.status_code == 409, stale.text
    assert "claim token is stale" in stale.json()["detail"]
    assert _upload(api, second.token, data, bearer="umv_wrong").status_code == 401
    damaged = _upload(api, second.token, data, sha="0" * 64)
    assert damaged.status_code == 422 and "sha256" in damaged.json()["detail"]
    with Session(api.engine) as s:
        assert s.exec(select(JobOutput)).all() == [] and s.exec(select(OutboxRow)).all() == []

    ok = _upload(api, second.token, data)
    assert ok.status_code == 200, ok.text
    assert ok.json()["already_recorded"] is False
    again = _upload(api, second.token, data)  # the worker did not get the first answer
    assert again.status_code == 200 and again.json()["already_recorded"] is True
    with Session(api.engine) as s:
        job = s.get(Job, api.job.id)
        assert job is not None and job.state == DONE and job.summary == "one object"
        (out,) = s.exec(select(JobOutput)).all()
        (box,) = s.exec(select(OutboxRow)).all()
    assert box.relpath == out.relpath and box.destination == "pacs"
    stored = Path(api.settings.storage.path) / out.relpath
    assert stored.read_bytes() == data  # written to the node's storage, byte for byte


def _worker_config(tmp_path: Path, name: str, node: Any, node_url: str, token: str) -> Any:
    """A worker's own config: the node's DB and broker, an empty storage root, the node's URL."""
    root = tmp_path / name
    root.mkdir()
    text = "\n".join(
        [
            "[storage]",
            f'path = "{root / "storage"}"',
            "[database]",
            f'url = "{node.database.url}"',
            "[broker]",
            f'url = "{node.broker.url}"',
            "[model]",
            'path = "tiny"',
            'device = "cpu"',
            "[worker]",
            f'node_url = "{node_url}"',
            f'node_token = "{token}"',
            "",
        ]
    )
    (root / "unimedvl.toml").write_text(text)
    return load_config(root / "unimedvl.toml")


def _rules_toml(rules: list[dict[str, Any]]) -> str:
    lines = [
        "[jobs]",
        "lease_seconds = 5",
        "sweep_interval_seconds = 0.5",
        "planned_grace_seconds = 1",
        "max_attempts = 4",
    ]
    for rule in rules:
        lines += [
            "[[rules]]",
            f"name = {json.dumps(rule['name'])}",
            f"match = {{ Modality = {json.dumps(rule['match']['Modality'])} }}",
        ]
        for task in rule["tasks"]:
            lines.append("[[rules.tasks]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in task.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_two_remote_workers_one_killed_mid_job_no_shared_disk(
    rabbit_vhost: str, pg_url: str, tmp_path: Path, start_worker: Any, orthanc: Any
) -> None:
    """`unimedvl node --api` on storage root A; two workers with empty roots B and C and only the
    node's URL; a CR study by C-STORE; the worker running the job is SIGKILLed mid-job: the other
    one finishes it, the outputs are recorded once, delivered to Orthanc, and B and C hold no file."""
    from dicom_node.console.auth import add_user, create_token
    from tests.jobs.test_worker import _c_store

    cfg = write_config(tmp_path, pg_url, rabbit_vhost, pacs=(orthanc.aet, orthanc.dicom_port))
    cfg.write_text(cfg.read_text() + _rules_toml(slow_rules(1000)))
    settings = load_config(cfg)
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    add_user(engine, "gpu", "worker-password-1", "worker")
    token = create_token(engine, "gpu")
    node_url = f"http://{settings.http.bind}"
    node_log = tmp_path / "node.log"
    log_fh = open(node_log, "ab")  # noqa: SIM115 - closed in finally
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "node", "--api", "--config", str(cfg)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log_fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    workers = [start_worker(_worker_config(tmp_path, n, settings, node_url, token)) for n in ("B", "C")]

    def jobs() -> list[Job]:
        with Session(engine) as s:
            return list(s.exec(select(Job).order_by(Job.id)))

    def diag() -> str:
        states = [(j.id, j.state, j.attempts, j.worker, j.error) for j in jobs()]
        tails = "\n".join(w.tail(3000) for w in workers)
        return f"jobs: {states}\n--- node\n{node_log.read_text(errors='replace')[-3000:]}\n--- workers\n{tails}"

    try:
        wait_for(lambda: _answers(f"{node_url}/healthz"), 60, "the node's API", diag)
        _c_store(settings.node.port, cr_study(tmp_path / "cr"))
        running = wait_for(lambda: (js := jobs()) and js[0].state == RUNNING and js[0], 90, "the job to start", diag)
        # Mid-job: past the WADO-RS fetch (the lease is renewed while the model runs).
        wait_for(
            lambda: (j := jobs()[0]).state == RUNNING and as_utc(j.lease_until) > as_utc(running.lease_until),  # type: ignore[operator]
            60,
            "a lease renewal",
            diag,
        )
        pid = int((running.worker or "").rsplit(":", 1)[1])
        (victim,) = [w for w in workers if _parent(pid) == w.proc.pid]
        victim.kill()
        with Session(engine) as s:
            row = s.get(Job, running.id)
            assert row is not None and row.state == RUNNING
            row.params = {**row.params, "steps": 2}  # the re-run only has to finish
            s.add(row)
            s.commit()
        done = wait_for(lambda: (j := jobs()[0]).state in (DONE, FAILED) and j, 90, "the re-run", diag)
        assert done.state == DONE, diag()
        assert done.attempts >= 2 and done.worker != running.worker
        with Session(engine) as s:
            outs = s.exec(select(JobOutput)).all()
            box = s.exec(select(OutboxRow)).all()
        assert len(outs) == 1 and len(box) == 1 and box[0].relpath == outs[0].relpath
        stored = Path(settings.storage.path) / outs[0].relpath
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == outs[0].sha256
        found = wait_for(
            lambda: httpx.post(f"{orthanc.url}/tools/lookup", content=outs[0].sop_instance_uid, timeout=10).json(),
            60,
            "delivery to Orthanc",
            diag,
        )
        assert [f["Type"] for f in found] == ["Instance"]
        # Nothing of the node's disk reached the workers' own roots: sources came over WADO-RS.
        assert "WADO-RS series: 1 instance(s)" in node_log.read_text(errors="replace")
        for name in ("B", "C"):
            assert [p for p in (tmp_path / name).rglob("*") if p.is_file() and p.name != "unimedvl.toml"] == []
        survivor = next(w for w in workers if w is not victim)
        survivor.stop()
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(10)
        log_fh.close()
        engine.dispose()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_remote_io_against_a_served_node(node_api: NodeAPI, tmp_path: Path) -> None:
    """RemoteIO over real HTTP: sources byte-identical to the index's sha256, the upload records once."""
    import threading

    import uvicorn

    from dicom_node.api import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(node_api.settings, engine=node_api.engine), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    remote = RemoteIO(f"http://127.0.0.1:{port}", node_api.worker_token, 10, cache=SourceCache())
    try:
        wait_for(lambda: server.started, 20, "the API server")
        c = claim(node_api.engine, node_api.job.id or 0, "remote:1")
        assert c is not None
        (ds,) = remote.load(node_api.engine, c.job)
        assert str(ds.SeriesInstanceUID) == node_api.series_uid
        out = dcmread(io.BytesIO(_result_object(next((tmp_path / "cr").iterdir()))))
        assert (
            remote.record(node_api.engine, c, [Output(out, "sc", node_api.series_uid)], summary="s", model_info=None)
            == 1
        )
        assert remote.bytes_in > 0 and remote.bytes_out > 0
        with Session(node_api.engine) as s:
            job = s.get(Job, node_api.job.id)
            assert job is not None and job.state == DONE and job.summary == "s"
            assert len(s.exec(select(JobOutput)).all()) == 1 and len(s.exec(select(OutboxRow)).all()) == 1
        # The next job on these sources (same sha256) takes the parsed dataset: nothing over HTTP.
        fetched = remote.bytes_in
        (again,) = remote.load(node_api.engine, c.job)
        assert again is ds and remote.bytes_in == fetched
    finally:
        remote.close()
        server.should_exit = True
        thread.join(10)


def test_worker_node_url_config_is_checked(tmp_path: Path) -> None:
    """`[worker] node_url` must be an http(s) URL and comes with a token; unset, the worker uses storage.path."""
    from dicom_node.config import ConfigError

    cfg = tmp_path / "unimedvl.toml"
    assert load_config(None).worker.node_url == ""
    cfg.write_text('[worker]\nnode_url = "gateway:8080"\nnode_token = "umv_x"\n')
    with pytest.raises(ConfigError, match="node_url must be http"):
        load_config(cfg)
    cfg.write_text('[worker]\nnode_url = "http://gateway:8080"\n')
    with pytest.raises(ConfigError, match="node_url needs node_token"):
        load_config(cfg)
