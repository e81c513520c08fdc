"""The exporter is woken by the commit that queues rows (no poll on the hot path) and keeps its
association to a busy destination open for a short idle time.

The fallback poll is set to 30 s here, so a delivery within a couple of seconds proves the wake-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.peers import StoreSCP
from dicom_node.export import Exporter, enqueue
from tests.conftest import require_tool
from tests.export.objects import ct_slices

REPO = Path(__file__).resolve().parents[2]
POLL = 30.0  # far above every bound below: only a wake-up can deliver in time
WOKEN_WITHIN = 3.0  # generous for a loaded 2-core machine, still 10x below the poll


class Delivered:
    """Records when each instance was confirmed by the destination."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.cond = threading.Condition()

    def __call__(self, _dest: str, item: Any, outcome: Any) -> None:
        if outcome.delivered:
            with self.cond:
                self.at[item.sop_instance_uid] = time.monotonic()
                self.cond.notify_all()

    def wait_for(self, uid: str, timeout: float) -> float:
        with self.cond:
            assert self.cond.wait_for(lambda: uid in self.at, timeout), f"not delivered within {timeout} s"
            return self.at[uid]


def _running(exporter: Exporter) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    t = threading.Thread(target=exporter.run_forever, args=(stop,), daemon=True)
    t.start()
    return stop, t


def _scp_dest(scp: StoreSCP) -> dict[str, Any]:
    return {"name": "scp", "kind": "dimse", "ae_title": scp.aet, "host": scp.host, "port": scp.port}


def _associations(scp: StoreSCP) -> int:
    return scp.log_path.read_text(errors="replace").count("Association Received")


def _releases(scp: StoreSCP) -> int:
    return scp.log_path.read_text(errors="replace").count("Association Release")


@pytest.mark.dcmtk
def test_in_process_commit_wakes_the_exporter(sqlite_engine, storage, make_settings, tmp_path: Path) -> None:
    """SQLite, rows committed in this process (e.g. a thread-pool worker): the after-commit hook wakes it."""
    require_tool("storescp")
    ct = ct_slices(tmp_path / "ct", 1)
    with StoreSCP(tmp_path / "scp") as scp:
        settings = make_settings(sqlite_engine, [_scp_dest(scp)], poll_seconds=POLL)
        seen = Delivered()
        exporter = Exporter(settings, sqlite_engine, storage, on_result=seen)
        stop, t = _running(exporter)
        try:
            committed = time.monotonic()
            enqueue(sqlite_engine, storage, ct[0], ["scp"])
            delay = seen.wait_for(str(ct[0].SOPInstanceUID), WOKEN_WITHIN) - committed
        finally:
            stop.set()
            t.join(30)
    assert delay < WOKEN_WITHIN


@pytest.mark.dcmtk
def test_commit_in_another_process_wakes_the_exporter(db_url: str, storage, make_settings, tmp_path: Path) -> None:
    """A worker process commits outbox rows; PostgreSQL's NOTIFY, or on SQLite the datagram to
    the exporter's wake-up socket, wakes this process's exporter."""
    from dicom_node.db import init_db, make_engine

    require_tool("storescp")
    init_db(db_url)
    engine = make_engine(db_url)
    ct = ct_slices(tmp_path / "ct", 1)
    ct[0].save_as(tmp_path / "out.dcm", enforce_file_format=True)
    script = (
        "import sys, time\n"
        "from dicom_node.db import make_engine\n"
        "from dicom_node.export import enqueue\n"
        "from dicom_node.storage import Storage\n"
        "engine = make_engine(sys.argv[1])\n"
        "storage = Storage(sys.argv[2], min_free_bytes=0)\n"
        "data = open(sys.argv[3], 'rb').read()\n"
        "enqueue(engine, storage, data, ['scp'])\n"
        "print(time.time())\n"
    )
    try:
        with StoreSCP(tmp_path / "scp") as scp:
            settings = make_settings(engine, [_scp_dest(scp)], poll_seconds=POLL)
            seen = Delivered()
            exporter = Exporter(settings, engine, storage, on_result=seen)
            stop, t = _running(exporter)
            try:
                assert exporter.wakeup.listening.wait(10), "LISTEN connection / wake-up socket not up"
                env = {**os.environ, "PYTHONPATH": str(REPO)}
                proc = subprocess.run(
                    [sys.executable, "-c", script, db_url, str(tmp_path / "storage"), str(tmp_path / "out.dcm")],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env=env,
                    check=True,
                )
                committed_wall = float(proc.stdout.strip().splitlines()[-1])
                delivered = seen.wait_for(str(ct[0].SOPInstanceUID), WOKEN_WITHIN + 5)
                delay = (time.time() - (time.monotonic() - delivered)) - committed_wall
            finally:
                stop.set()
                t.join(30)
    finally:
        engine.dispose()
    assert delay < WOKEN_WITHIN


@pytest.mark.dcmtk
def test_outputs_one_at_a_time_share_one_association_closed_after_idle(
    sqlite_engine, storage, make_settings, tmp_path: Path
) -> None:
    """Five job outputs queued one after another go over one association (counted in storescp's
    own log), which is released once idle for keep_open_seconds."""
    require_tool("storescp")
    keep = 1.0
    ct = ct_slices(tmp_path / "ct", 5)
    with StoreSCP(tmp_path / "scp", extra_args=["-v"]) as scp:
        before, released_before = _associations(scp), _releases(scp)  # the readiness C-ECHO
        settings = make_settings(sqlite_engine, [_scp_dest(scp)], poll_seconds=POLL, keep_open_seconds=keep)
        seen = Delivered()
        exporter = Exporter(settings, sqlite_engine, storage, on_result=seen)
        stop, t = _running(exporter)
        try:
            for ds in ct:
                enqueue(sqlite_engine, storage, ds, ["scp"])
                last = seen.wait_for(str(ds.SOPInstanceUID), WOKEN_WITHIN)
            assert _associations(scp) - before == 1
            deadline = time.monotonic() + keep + WOKEN_WITHIN
            while _releases(scp) == released_before and time.monotonic() < deadline:
                time.sleep(0.05)
            released = time.monotonic()
            assert _releases(scp) - released_before == 1, "idle association was not released"
        finally:
            stop.set()
            t.join(30)
        assert len(scp.received_files()) == 5
    assert released - last >= keep * 0.9  # not released before the idle time


@pytest.mark.dcmtk
def test_kept_association_dropped_by_the_peer_is_replaced_without_a_failed_attempt(
    sqlite_engine, storage, make_settings, tmp_path: Path
) -> None:
    """The PACS ends the idle association (its process dies): the next output goes over a new
    association at its first attempt, no retry and no backoff."""
    from sqlmodel import Session, select

    from dicom_node.export.models import OutboxRow

    require_tool("storescp")
    ct = ct_slices(tmp_path / "ct", 2)
    with StoreSCP(tmp_path / "scp", extra_args=["-v"]) as scp:
        before = _associations(scp)
        settings = make_settings(sqlite_engine, [_scp_dest(scp)], poll_seconds=POLL, keep_open_seconds=POLL)
        seen = Delivered()
        exporter = Exporter(settings, sqlite_engine, storage, on_result=seen)
        stop, t = _running(exporter)
        try:
            enqueue(sqlite_engine, storage, ct[0], ["scp"])
            seen.wait_for(str(ct[0].SOPInstanceUID), WOKEN_WITHIN)
            assert scp._proc is not None
            pid = scp._proc.pid
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            assert len(children) == 1, children  # storescp --fork: one child per association
            os.kill(int(children[0]), signal.SIGKILL)
            enqueue(sqlite_engine, storage, ct[1], ["scp"])
            seen.wait_for(str(ct[1].SOPInstanceUID), WOKEN_WITHIN)
        finally:
            stop.set()
            t.join(30)
        assert _associations(scp) - before == 2
    with Session(sqlite_engine) as s:
        rows = s.exec(select(OutboxRow)).all()
    assert [(r.state, r.attempts) for r in rows] == [("done", 1), ("done", 1)]


@pytest.mark.dcmtk
@pytest.mark.postgres
def test_listen_connection_terminated_by_the_server_reconnects(
    pg_url: str, storage, make_settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL ends the exporter's LISTEN backend (pg_terminate_backend, as a restart or an
    idle-session kill would): the exporter reconnects, logs the loss and the return once each,
    and a commit wakes it again (the 30 s poll cannot explain a delivery within seconds)."""
    import logging

    from sqlalchemy import text

    from dicom_node.db import init_db, make_engine

    require_tool("storescp")
    caplog.set_level(logging.INFO, logger="dicom_node.export.wakeup")
    init_db(pg_url)
    engine = make_engine(pg_url)
    ct = ct_slices(tmp_path / "ct", 2)
    try:
        with StoreSCP(tmp_path / "scp") as scp:
            settings = make_settings(engine, [_scp_dest(scp)], poll_seconds=POLL)
            seen = Delivered()
            exporter = Exporter(settings, engine, storage, on_result=seen)
            stop, t = _running(exporter)
            try:
                wakeup = exporter.wakeup
                assert wakeup.listening.wait(10), "LISTEN connection not up"
                first_pid = wakeup.backend_pid
                with engine.connect() as conn:
                    assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first_pid}).scalar()
                deadline = time.monotonic() + 20
                while wakeup.reconnects < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert wakeup.reconnects == 1 and wakeup.listening.is_set()
                assert wakeup.backend_pid not in (None, first_pid)
                # Two outputs one after the other: the second arrives while the loop waits on its
                # event, so only the NOTIFY on the new connection can deliver it in time.
                for ds in ct:
                    enqueue(engine, storage, ds, ["scp"])
                    seen.wait_for(str(ds.SOPInstanceUID), WOKEN_WITHIN)
            finally:
                stop.set()
                t.join(30)
    finally:
        engine.dispose()
    lines = [r.getMessage() for r in caplog.records if r.name == "dicom_node.export.wakeup"]
    assert len([m for m in lines if "LISTEN connection lost" in m]) == 1, lines
    assert len([m for m in lines if "LISTEN connection back after" in m]) == 1, lines
