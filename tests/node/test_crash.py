"""SIGKILL of a running `unimedvl node` mid-transfer: everything acknowledged survives."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlmodel import Session, select

from dicom_node.db import make_engine
from dicom_node.models import Instance, Rejection, Study
from tests.conftest import free_port, require_tool
from tests.node.conftest import associate, make_ct, node_sections, write_config

N = 200


@pytest.mark.dcmtk
def test_sigkill_loses_nothing_acknowledged(db_url: str, tmp_path: Path, node_process: Any) -> None:
    storescu = require_tool("storescu")
    port = free_port()
    cfg = write_config(tmp_path / "unimedvl.toml", **node_sections(tmp_path, db_url, port=port))
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files_dir = tmp_path / "study"
    files_dir.mkdir()
    datasets = []
    for i in range(N):
        ds = make_ct(study, series, instance_number=i + 1, size=16)
        ds.save_as(files_dir / f"{i:04d}.dcm", enforce_file_format=True)
        datasets.append(ds)

    node = node_process(cfg, port)
    acked: list[str] = []
    done = threading.Event()

    def send() -> None:
        assoc = associate(port)
        try:
            for ds in datasets:
                if not assoc.is_established:
                    break
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) == 0x0000:
                    acked.append(ds.SOPInstanceUID)
        except Exception:  # the peer vanished mid-message
            pass
        finally:
            if assoc.is_established:
                assoc.abort()
            done.set()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.005)
    node.kill()  # SIGKILL the whole process group, mid-transfer
    assert done.wait(30)
    assert 60 <= len(acked) < N, f"kill did not land mid-transfer ({len(acked)} acknowledged)"

    # Restart: the start-up sweep removes temp files; every acknowledged instance is there, intact.
    node = node_process(cfg, port)
    root = tmp_path / "storage"
    assert not list((root / "tmp").iterdir()), "temp files remain after restart"
    engine = make_engine(db_url)
    try:
        with Session(engine) as s:
            rows = {r.sop_instance_uid: r for r in s.exec(select(Instance)).all()}
        missing = [u for u in acked if u not in rows]
        assert not missing, f"{len(missing)} acknowledged instance(s) lost"
        for r in rows.values():
            p = root / r.relpath
            assert p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == r.sha256

        # Re-send the whole study with DCMTK: exactly N instances, one study, nothing twice.
        out = subprocess.run(
            [storescu, "-aec", "UNIMEDVL", "+sd", "127.0.0.1", str(port), str(files_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        with Session(engine) as s:
            rows_after = s.exec(select(Instance)).all()
            study_row = s.exec(select(Study)).one()
        assert len(rows_after) == N and {r.sop_instance_uid for r in rows_after} == {d.SOPInstanceUID for d in datasets}
        assert study_row.instance_count == N
        # Acknowledged ones came back as identical duplicates (same bytes: counted, not stored twice).
        assert sum(1 for r in rows_after if r.duplicate_count) >= len(acked)
        for r in rows_after:
            p = root / r.relpath
            assert hashlib.sha256(p.read_bytes()).hexdigest() == r.sha256
            back = pydicom.dcmread(p)
            assert back.PixelData == datasets[int(back.InstanceNumber) - 1].PixelData
    finally:
        engine.dispose()
    assert node.stop() == 0  # clean shutdown on SIGTERM


def test_crash_between_rename_and_index_commit_is_reconciled(
    db_url: str, tmp_path: Path, node_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL exactly after the object's rename, before its row commits; the restart indexes it,
    quarantines a broken object with a reason and removes a stray temp file."""
    port = free_port()
    cfg = write_config(tmp_path / "unimedvl.toml", **node_sections(tmp_path, db_url, port=port))
    ds = make_ct(size=16)
    monkeypatch.setenv("UNIMEDVL_CRASH_AT", "after_rename")
    node = node_process(cfg, port)
    assoc = associate(port)
    try:
        status = assoc.send_c_store(ds)
    except Exception:
        status = None
    assert getattr(status, "Status", None) != 0x0000  # never acknowledged
    assert node.proc is not None and node.proc.wait(20) != 0  # killed in the window
    node.kill()
    root = tmp_path / "storage"
    objects = [p for p in (root / "objects").rglob("*.dcm")]
    assert len(objects) == 1  # the renamed object, without a row
    engine = make_engine(db_url)
    with Session(engine) as s:
        assert s.exec(select(Instance)).all() == []
    # What else a crash can leave: a broken object and a temp file.
    broken = objects[0].parent / ("f" * 32 + ".dcm")
    broken.write_bytes(objects[0].read_bytes()[:300])
    (root / "tmp" / "leftover.tmp").write_bytes(b"partial")

    monkeypatch.delenv("UNIMEDVL_CRASH_AT")
    node = node_process(cfg, port)
    with Session(engine) as s:
        rows = s.exec(select(Instance)).all()
        assert [r.sop_instance_uid for r in rows] == [ds.SOPInstanceUID]
        assert (root / rows[0].relpath) == objects[0]
        rejections = s.exec(select(Rejection).where(Rejection.stage == "reconcile")).all()
        assert len(rejections) == 1 and rejections[0].reason == "incomplete"
    assert not broken.exists()
    assert (root / "quarantine" / broken.name).exists()
    assert "incomplete" in (root / "quarantine" / f"{broken.name}.reason").read_text()
    assert list((root / "tmp").iterdir()) == []
    # The sender's retry is then an identical duplicate: acknowledged, one row, one file.
    assoc = associate(port)
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    with Session(engine) as s:
        assert len(s.exec(select(Instance)).all()) == 1
    assert len([p for p in (root / "objects").rglob("*.dcm")]) == 1
    node.stop()
    engine.dispose()
