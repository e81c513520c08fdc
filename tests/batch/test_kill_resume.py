"""Faults: the batch process (and its worker) SIGKILLed mid-run and resumed, on the embedded
defaults and on RabbitMQ + PostgreSQL with two worker processes (one of them SIGKILLed too):
no item lost, none done twice, no output file twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.batch.conftest import fixed_length_rules, make_archive, run_cli
from tests.conftest import REPO
from tests.jobs.conftest import wait_for, write_config

# Items of fixed length (60 denoising steps, ~1.2 s each; tests/batch/conftest.fixed_length_rules):
# the batch is still running when the test kills it, however fast the machine and the worker.
STEPS = 60


def _tasks(folder: Path) -> list[str]:
    return ["--rules", str(fixed_length_rules(folder, STEPS)), "--lease-seconds", "3", "--max-fetch", "2"]


def _popen(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", *args],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )


def _states(db_url: str) -> dict[str, int]:
    eng = create_engine(db_url.replace("postgresql+psycopg://", "postgresql+psycopg://"))
    try:
        with eng.connect() as c:
            return dict(c.execute(text("SELECT state, count(*) FROM batch_item GROUP BY state")).all())
    except Exception:
        return {}
    finally:
        eng.dispose()


def _check_exactly_once(db_url: str, out: Path, n_items: int) -> None:
    eng = create_engine(db_url)
    with eng.connect() as c:
        items = c.execute(text("SELECT id, state, attempts FROM batch_item")).all()
        rows = c.execute(text("SELECT item_id, task, output_paths FROM batch_result")).all()
    eng.dispose()
    assert len(items) == n_items and all(s == "done" for _, s, _ in items), items
    assert sorted(r[0] for r in rows) == sorted(i for i, _, _ in items)  # one report row per item, none twice
    recorded = sorted(p for r in rows for p in (json.loads(r[2]) if isinstance(r[2], str) else r[2]))
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*.dcm"))
    assert on_disk == recorded  # every file recorded once; no leftover of a killed attempt


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_kill_batch_and_resume_embedded(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    studies = make_archive(root, n_cr=4, ct_slices=0, us=False)
    db_url = f"sqlite:///{tmp_path / 'index.db'}"
    cfg = write_config(tmp_path, db_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    out = tmp_path / "out"
    args = ["batch", str(root), "--out", str(out), *_tasks(tmp_path), "--json-progress", "-c", str(cfg)]
    log = tmp_path / "batch-1.log"
    proc = _popen(args, log)
    try:
        wait_for(lambda: _states(db_url).get("done", 0) >= 1, 240, "a first item done", log.read_text)
        # The whole host dies: the batch process and its embedded worker, no cleanup at all.
        worker_pids = [int(p) for m in re.findall(r"started \(pid ([\d, ]+)\)", log.read_text()) for p in m.split(",")]
        assert worker_pids, log.read_text()[-2000:]
        _kill_group(proc.pid)
        for pid in worker_pids:
            _kill_group(pid)
        proc.wait(10)
    finally:
        _kill_group(proc.pid)
    states = _states(db_url)
    assert sum(states.values()) == len(studies) and states.get("done", 0) < len(studies), states
    # The same command again continues where it stopped.
    r = run_cli(args, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    _check_exactly_once(db_url, out, len(studies))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_kill_batch_and_a_worker_resume_rabbitmq_postgres(tmp_path: Path, pg_url: str, rabbit_vhost: str) -> None:
    from dicom_node.config import load_config
    from dicom_node.jobs.worker import start_embedded_worker

    root = tmp_path / "archive"
    studies = make_archive(root, n_cr=5, ct_slices=0, us=False)
    cfg = write_config(tmp_path, pg_url, rabbit_vhost)
    settings = load_config(cfg)
    logs = [(tmp_path / f"worker-{i}.log").open("wb") for i in range(2)]
    env = {"PYTHONPATH": str(REPO)}
    workers: list[Any] = [
        start_embedded_worker(settings, queues=["batch"], stdout=f, stderr=subprocess.STDOUT, env=env) for f in logs
    ]
    out = tmp_path / "out"
    args = ["batch", str(root), "--out", str(out), *_tasks(tmp_path), "--workers", "0"]
    args += ["--json-progress", "-c", str(cfg)]
    log = tmp_path / "batch-1.log"
    proc = _popen(args, log)
    try:
        wait_for(lambda: _states(pg_url).get("done", 0) >= 1, 240, "a first item done", log.read_text)
        _kill_group(proc.pid)  # the batch process dies
        wait_for(lambda: _states(pg_url).get("running", 0) >= 1, 120, "an item running", log.read_text)
        _kill_group(workers[0].pid)  # and a worker, mid-item (its message is redelivered / its lease expires)
        workers[0] = start_embedded_worker(
            settings, queues=["batch"], stdout=logs[0], stderr=subprocess.STDOUT, env=env
        )
        r = run_cli(["batch", "--resume", "1", "--workers", "0", "--json-progress", "-c", str(cfg)], timeout=400)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        _check_exactly_once(pg_url, out, len(studies))
    finally:
        _kill_group(proc.pid)
        for w in workers:
            _kill_group(w.pid)
        for f in logs:
            f.close()
