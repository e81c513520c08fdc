"""A disk error while a data set arrives: 0xA700 with an Error Comment, a rejection row, no temp
file left, and an association that stores the next instance once the disk takes writes again.

The errors are real: ENOSPC from a small tmpfs holding the node's storage (mounting one needs
root; the test says so and skips otherwise), EFBIG from RLIMIT_FSIZE lowered on a running node
process (any user). Each is swept over where the write stops: at the command (no room for the
file's start), at the first data fragment, in the middle, at the last fragment.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage
from sqlmodel import Session, select

from dicom_node.db import make_engine
from dicom_node.models import Instance, Rejection
from dicom_node.transport_guard import META_BOUND
from dicom_node.write_check import DEFAULT_MARGIN
from tests.conftest import free_port, require_tool
from tests.node.conftest import make_ct, node_sections, write_config
from tests.node.raw_dimse import RawAssociation, encode_dataset, store_command

KIB = 1024
PDV = 60 * KIB  # data fragment size the raw sender uses (whole pages: the tmpfs counts pages)
FRAGMENTS = 9  # data fragments of the instance sent (PDV each, the last one short)


def _instance(n: int) -> tuple[Any, bytes]:
    """A CT instance whose encoded data set spans FRAGMENTS fragments of PDV bytes."""
    ds = make_ct(size=512, instance_number=n)  # 512 KiB of pixels + header: 8 x 60 KiB and 32 KiB
    data = encode_dataset(ds)
    assert (FRAGMENTS - 1) * PDV < len(data) <= FRAGMENTS * PDV
    return ds, data


def _store(assoc: RawAssociation, n: int) -> Any:
    ds, data = _instance(n)
    return assoc.store(store_command(CTImageStorage, ds.SOPInstanceUID, message_id=n), data, max_pdv=PDV)


def _rejections(engine: Any, reason: str, expect: int) -> list[Rejection]:
    deadline = time.monotonic() + 5
    while True:
        with Session(engine) as s:
            rows = list(s.exec(select(Rejection).where(Rejection.reason == reason)).all())
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def _assert_refused(rsp: Any, error: str) -> None:
    assert rsp is not None, "no C-STORE response: the association ended"
    assert rsp.Status == 0xA700, f"status 0x{rsp.Status:04X}"
    assert rsp.ErrorComment == f"Node storage failed while receiving ({error})"


# ---------------------------------------------------------------------------------- ENOSPC


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted where the node's storage goes."""
    mnt = tmp_path / "storage"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    # The suite runs as root (scripts/setup.sh installs with apt-get): a tmpfs that cannot be mounted is
    # a broken test machine, not a reason to leave the full-disk path untested.
    assert done.returncode == 0, f"mounting a tmpfs failed: {done.stderr.decode(errors='replace').strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> None:
    """Leave about `leave` bytes free on the filesystem at `mnt` (a filler file takes the rest)."""
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(mnt)
    take = max(st.f_bavail * st.f_frsize - leave, 0)
    with open(filler, "wb") as fh:
        try:
            fh.write(b"\xff" * take)
            fh.flush()
        except OSError:  # the last page: the filesystem is as full as it gets
            pass


# Free bytes before the instance, and where its writes must stop.
ENOSPC_CASES = {
    "full disk (at the command)": 0,
    "below the margin (at the command)": DEFAULT_MARGIN // 2,
    "first data fragment": DEFAULT_MARGIN + PDV // 2,
    "second data fragment": DEFAULT_MARGIN + PDV + PDV // 2,
    "middle of the data set": DEFAULT_MARGIN + 5 * PDV + PDV // 2,
    "last data fragment": DEFAULT_MARGIN + (FRAGMENTS - 1) * PDV + 16 * KIB,
}


def test_disk_full_while_receiving_is_answered_and_the_association_goes_on(
    small_fs: Path, make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    """ENOSPC swept over where the data set's writes stop; after each refusal the disk gets its
    space back and the same association stores an instance."""
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'index.db'}"), completion=False)
    assoc = RawAssociation(node.port, CTImageStorage)
    try:
        n = 0
        for case, leave in ENOSPC_CASES.items():
            _fill(small_fs, leave)
            n += 1
            rsp = _store(assoc, n)
            _assert_refused(rsp, "ENOSPC")
            assert list((small_fs / "tmp").iterdir()) == [], case
            (small_fs / "filler").unlink()  # space is back
            n += 1
            ok = _store(assoc, n)
            assert ok is not None and ok.Status == 0, case
    finally:
        assoc.release()
    rows = _rejections(node.engine, "storage_error", len(ENOSPC_CASES))
    assert len(rows) == len(ENOSPC_CASES)
    assert all(r.status == 0xA700 and "ENOSPC" in r.detail and r.stage == "store" for r in rows)
    with Session(node.engine) as s:
        assert len(s.exec(select(Instance)).all()) == len(ENOSPC_CASES)
    assert list((small_fs / "tmp").iterdir()) == []


def test_full_disk_leaves_data_sets_kept_in_memory_alone(
    small_fs: Path, make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    """Only C-STORE data sets go to a file: with the storage full, an MPPS N-CREATE (its data set
    held in memory, its row in the index elsewhere) is still received whole and stored."""
    import pydicom

    from tests.node.test_mpps import _create_ds, _mpps_assoc, _n_create

    node = start_node(make_settings(f"sqlite:///{tmp_path / 'index.db'}"), completion=False)
    _fill(small_fs, 0)
    assoc = _mpps_assoc(node.port)
    try:
        assert _n_create(assoc, _create_ds(pydicom.uid.generate_uid()), pydicom.uid.generate_uid()) == 0x0000
    finally:
        assoc.release()


# ---------------------------------------------------------------------------------- EFBIG


def _set_fsize(pid: int, limit: int) -> None:
    """The soft RLIMIT_FSIZE of a running process (the hard one stays, so it can be raised again)."""
    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


# RLIMIT_FSIZE while the instance arrives: its writes end past the limit at this fragment.
EFBIG_CASES = {
    "first data fragment": META_BOUND + PDV // 2,
    "middle of the data set": META_BOUND + 4 * PDV + PDV // 2,
    "last data fragment": META_BOUND + (FRAGMENTS - 1) * PDV + 16 * KIB,
}


@pytest.mark.dcmtk
def test_file_size_limit_while_receiving(tmp_path: Path, node_process: Any, pg_url: str) -> None:
    """EFBIG (the node process under a small RLIMIT_FSIZE; the index on PostgreSQL so only the
    received file meets the limit) swept over where the writes stop, on one raw association;
    then the exact case with DCMTK storescu: refused 0xA700, and once the limit is lifted a new
    association stores it."""
    storescu = require_tool("storescu")
    port = free_port()
    cfg = write_config(tmp_path / "unimedvl.toml", **node_sections(tmp_path, pg_url, port=port))
    node = node_process(cfg, port)
    assert node.proc is not None
    pid = node.proc.pid
    unlimited = resource.prlimit(pid, resource.RLIMIT_FSIZE)[0]
    assoc = RawAssociation(port, CTImageStorage)
    try:
        n = 0
        for case, limit in EFBIG_CASES.items():
            _set_fsize(pid, limit)
            n += 1
            _assert_refused(_store(assoc, n), "EFBIG")
            _set_fsize(pid, unlimited)
            n += 1
            ok = _store(assoc, n)
            assert ok is not None and ok.Status == 0, case
    finally:
        assoc.release()

    ct = tmp_path / "ct.dcm"
    make_ct(size=512, instance_number=99).save_as(ct, enforce_file_format=True)
    _set_fsize(pid, 256 * KIB)
    send = [storescu, "-v", "-aec", "UNIMEDVL", "127.0.0.1", str(port), str(ct)]
    refused = subprocess.run(send, capture_output=True, text=True, timeout=60)
    out = refused.stdout + refused.stderr
    assert "Refused: OutOfResources" in out, out[-2000:]  # DCMTK's name for 0xA700
    _set_fsize(pid, unlimited)
    stored = subprocess.run(send, capture_output=True, text=True, timeout=60)
    out = stored.stdout + stored.stderr
    assert stored.returncode == 0 and "Success" in out, out[-2000:]  # a new association, limit lifted

    engine = make_engine(pg_url)
    try:
        rows = _rejections(engine, "storage_error", len(EFBIG_CASES) + 1)
        with Session(engine) as s:
            stored_n = len(s.exec(select(Instance)).all())
    finally:
        engine.dispose()
    assert len(rows) == len(EFBIG_CASES) + 1
    assert all(r.status == 0xA700 and "EFBIG" in r.detail for r in rows)
    assert stored_n == len(EFBIG_CASES) + 1
    assert list((tmp_path / "storage" / "tmp").iterdir()) == []
    log = (tmp_path / "node.log").read_text()
    assert "storage would fail" in log and "EFBIG" in log
    assert "PAT-1" not in log  # no patient identifier in the log lines
