"""Large instances sent by DCMTK storescu: received to a file as they arrive (bounded memory in
the node process), and one over `max_instance_bytes` refused 0xA700 while it arrives on an
association that then stores the next instance."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from dicom_node.db import make_engine
from dicom_node.models import Instance, Rejection
from dicom_node.synthetic import write_large_ct
from tests.conftest import free_port, require_tool
from tests.node.conftest import make_ct, node_sections, write_config

MB = 1024 * 1024


def _vm_hwm(pid: int) -> int:
    """Peak resident set size of a process (bytes), from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM line")


def _storescu(storescu: str, port: int, *files: Path) -> subprocess.CompletedProcess[str]:
    # --no-halt: go on to the next file after a refused one (on the same association).
    return subprocess.run(
        [storescu, "-v", "--no-halt", "-aec", "UNIMEDVL", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _dataset_sha256(path: Path) -> str:
    """sha256 of a Part 10 file's data set (after its File Meta group, PS3.10 7.1)."""
    with open(path, "rb") as fh:
        head = fh.read(144)
        fh.seek(144 + int.from_bytes(head[140:144], "little"))
        return hashlib.file_digest(fh, "sha256").hexdigest()


@pytest.mark.dcmtk
def test_large_instance_keeps_node_memory_bounded(tmp_path: Path, node_process: Any) -> None:
    """A 256 MiB instance grows the node process's peak RSS by far less than its size."""
    storescu = require_tool("storescu")
    port = free_port()
    db_url = f"sqlite:///{tmp_path / 'index.db'}"
    cfg = write_config(tmp_path / "unimedvl.toml", **node_sections(tmp_path, db_url, port=port))
    small = tmp_path / "small.dcm"
    make_ct(size=64).save_as(small, enforce_file_format=True)
    big = tmp_path / "big.dcm"
    size = write_large_ct(big, 16384, 8192)  # 256 MiB of native pixel data
    node = node_process(cfg, port)
    assert node.proc is not None
    assert _storescu(storescu, port, small).returncode == 0  # warm: pools, threads, caches
    before = _vm_hwm(node.proc.pid)
    out = _storescu(storescu, port, big)
    assert out.returncode == 0 and "Success" in out.stderr + out.stdout, (out.stdout + out.stderr)[-2000:]
    growth = _vm_hwm(node.proc.pid) - before
    engine = make_engine(db_url)
    try:
        with Session(engine) as s:
            row = s.exec(select(Instance).order_by(Instance.id.desc())).first()  # type: ignore[union-attr]
    finally:
        engine.dispose()
    assert row is not None and row.size > size - MB
    assert _dataset_sha256(tmp_path / "storage" / row.relpath) == _dataset_sha256(big)  # the data set as sent
    assert growth < 100 * MB, f"node peak RSS grew {growth / MB:.0f} MiB for a {size / MB:.0f} MiB instance"
    assert list((tmp_path / "storage" / "tmp").iterdir()) == []


@pytest.mark.dcmtk
def test_over_cap_instance_refused_while_arriving_then_next_one_stored(
    make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    """storescu sends an instance over max_instance_bytes and a normal one on one association:
    0xA700 (Out of Resources) with an Error Comment for the first, success for the second."""
    storescu = require_tool("storescu")
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}", node={"max_instance_bytes": 4 * MB}))
    big = tmp_path / "a_big.dcm"
    write_large_ct(big, 2048, 2048)  # 8 MiB
    small = tmp_path / "b_small.dcm"
    small_ds = make_ct(size=64)
    small_ds.save_as(small, enforce_file_format=True)
    out = _storescu(storescu, node.port, big, small)
    log = out.stdout + out.stderr
    assert log.count("Association Accepted") == 1, log[-3000:]
    assert "Aborted" not in log, log[-3000:]
    assert "Received Store Response (Refused: OutOfResources)" in log, log[-3000:]
    assert "Received Store Response (Success)" in log, log[-3000:]
    deadline = time.monotonic() + 10
    while True:
        with Session(node.engine) as s:
            rejected = s.exec(select(Rejection).where(Rejection.reason == "too_large")).all()
            stored = s.exec(select(Instance)).all()
        if (rejected and stored) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(rejected) == 1 and rejected[0].status == 0xA700 and "discarded while it arrived" in rejected[0].detail
    assert [i.sop_instance_uid for i in stored] == [small_ds.SOPInstanceUID]
    assert list((tmp_path / "storage" / "tmp").iterdir()) == []
