"""`unimedvl serve` on embedded defaults (SQLite, embedded broker, local storage, tiny model) with
`unimedvl demo` and a real Orthanc PACS: SR, SEG, TID 1500 and SC arrive in the source study;
a restart with jobs queued and outputs unsent resumes everything without duplicates."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.peers import OrthancServer
from dicom_node.config import load_config
from dicom_node.demo import _finished, make_demo_study, send
from tests.conftest import REPO, free_port, require_tool

UNIMEDVL = [sys.executable, "-m", "dicom_node.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
EXPECTED_MODALITIES = {"SR": 4, "SEG": 1, "OT": 1}  # 2 reports + VQA + TID 1500; SEG; SC


def write_config(folder: Path, pacs_port: int) -> Path:
    cfg = folder / "unimedvl.toml"
    cfg.write_text(
        f"""
[node]
host = "127.0.0.1"
port = {free_port()}
[http]
bind = "127.0.0.1:{free_port()}"
[completion]
study_quiet_seconds = 2
series_quiet_seconds = 1
check_interval_seconds = 0.5
[export]
backoff_initial_seconds = 1
backoff_max_seconds = 2
max_attempts = 100
[jobs]
lease_seconds = 6
sweep_interval_seconds = 1
[[destinations]]
name = "pacs"
kind = "dimse"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}
"""
    )
    return cfg


class Serve:
    def __init__(self, cfg: Path) -> None:
        self.cfg = cfg
        self.settings = load_config(cfg)
        self.api = f"http://127.0.0.1:{self.settings.http.port}"
        self.log = cfg.parent / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*UNIMEDVL, "serve", "--config", str(self.cfg)], cwd=self.cfg.parent, env=ENV, stdout=out, stderr=out
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.api}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("serve did not become healthy:\n" + self.log.read_text()[-3000:])

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def token(self) -> str:
        """An API token of the admin `serve` created on first start (the API needs a login)."""
        if not hasattr(self, "_token"):
            out = subprocess.run(
                [*UNIMEDVL, "users", "token", "admin", "--config", str(self.cfg)],
                capture_output=True,
                text=True,
                env=ENV,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            self._token = out.stdout.strip()
        return self._token

    def timeline(self, study_uid: str) -> dict | None:
        r = httpx.get(
            f"{self.api}/api/studies/{study_uid}/timeline",
            timeout=10,
            headers={"Authorization": f"Bearer {self.token()}"},
        )
        return r.json() if r.status_code == 200 else None

    def wait(self, study_uid: str, predicate, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        tl = None
        while time.monotonic() < deadline:
            tl = self.timeline(study_uid)
            if tl is not None and predicate(tl):
                return tl
            time.sleep(0.5)
        raise AssertionError(f"timed out; last timeline: {tl}\n" + self.log.read_text()[-3000:])


@pytest.fixture
def serve_factory() -> Iterator:
    started: list[Serve] = []

    def make(cfg: Path) -> Serve:
        s = Serve(cfg)
        started.append(s)
        return s

    yield make
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def orthanc_modalities(pacs: OrthancServer, study_uid: str) -> dict[str, int]:
    with httpx.Client(base_url=pacs.url, timeout=10) as c:
        found = c.post("/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).json()
        assert len(found) == 1, found
        counts: dict[str, int] = {}
        for series in c.get(f"/studies/{found[0]}/series").json():
            modality = series["MainDicomTags"].get("Modality", "")
            counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


@pytest.mark.orthanc
def test_serve_and_demo_deliver_every_object_type_to_orthanc(tmp_path: Path, serve_factory) -> None:
    require_tool("Orthanc")
    with OrthancServer(tmp_path / "orthanc") as pacs:
        cfg = write_config(tmp_path, pacs.dicom_port)
        serve = serve_factory(cfg)
        serve.start()
        demo = subprocess.run(
            [*UNIMEDVL, "demo", "--config", str(cfg), "--timeout", "240"],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "synthesize" in demo.stdout and "failed" not in demo.stdout
        study_uid = demo.stdout.split("demo study ", 1)[1].split(":", 1)[0].strip()
        counts = orthanc_modalities(pacs, study_uid)
        assert {m: counts.get(m, 0) for m in EXPECTED_MODALITIES} == EXPECTED_MODALITIES, counts
        status = subprocess.run(
            [*UNIMEDVL, "status", "--config", str(cfg)], cwd=tmp_path, env=ENV, capture_output=True, text=True
        )
        assert status.returncode == 0 and "Jobs" in status.stdout, status.stdout + status.stderr
        _console_shows_the_demo_study(serve, demo.stdout)
        assert serve.stop() == 0
        assert "DEMO^0001" not in serve.log.read_text()  # no PHI in the logs
        # The serve process froze its start-up heap (dicom_node/heap.py), and its worker child too.
        assert re.search(r"start-up heap frozen: [1-9]\d* objects", serve.log.read_text())


def _console_shows_the_demo_study(serve: Serve, demo_out: str) -> None:
    """README's first-run step: the password `serve` printed logs in; the demo study's page shows
    the SR text and the SEG overlay."""
    import re

    password = re.search(r"created with password\s+(\S+)", serve.log.read_text())
    assert password, serve.log.read_text()[-2000:]
    page_url = re.search(r"http://\S+/studies/\d+", demo_out)
    assert page_url, demo_out
    with httpx.Client(base_url=serve.api, timeout=20) as c:
        assert c.get(page_url.group(0), follow_redirects=False).status_code == 303  # login first
        r = c.post("/login", data={"username": "admin", "password": password.group(1), "next": "/"})
        assert r.status_code == 303 and r.headers["location"] == "/", r.text
        assert "Dashboard" in c.get("/").text
        page = c.get(page_url.group(0)).text
        assert "Findings" in page or "Impression" in page or "Answer" in page  # report/VQA text from the SR
        previews = re.findall(r'class="preview preview-(seg|sc)" src="([^"]+)"', page)
        assert {k for k, _ in previews} == {"seg", "sc"}, previews
        for _kind, src in previews:
            img = c.get(src)
            assert img.status_code == 200 and img.headers["content-type"] == "image/png", src
            assert img.content[:4] == b"\x89PNG"


@pytest.mark.orthanc
def test_restart_resumes_queued_jobs_and_unsent_outputs(tmp_path: Path, serve_factory) -> None:
    require_tool("Orthanc")
    pacs_port = free_port()
    cfg = write_config(tmp_path, pacs_port)  # the PACS is down at first
    serve = serve_factory(cfg)
    serve.start()
    study_uid, files = make_demo_study(tmp_path / "study")
    s = serve.settings
    assert send(files, "127.0.0.1", s.node.port, s.node.ae_title) == len(files)
    # stop as soon as the study is planned: jobs queued or running, nothing delivered
    serve.wait(study_uid, lambda tl: bool(tl["revisions"]) and tl["revisions"][-1]["planned_at"] is not None)
    assert serve.stop() == 0
    with OrthancServer(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
        serve.start()
        tl = serve.wait(study_uid, _finished, timeout=300)
        jobs = [j for r in tl["revisions"] for j in r["jobs"]]
        assert len(jobs) == 5 and all(j["state"] == "done" for j in jobs), jobs
        outputs = sum(j["outputs"] for j in jobs)
        deliveries = [d for j in jobs for d in j["deliveries"]]
        assert len(deliveries) == outputs and all(d["state"] == "done" for d in deliveries), deliveries
        counts = orthanc_modalities(pacs, study_uid)
        assert sum(counts.values()) == outputs, counts  # exactly once in the PACS
        assert {m: counts.get(m, 0) for m in EXPECTED_MODALITIES} == EXPECTED_MODALITIES, counts
    assert serve.stop() == 0
