"""Behaviour of the ingest fast paths: shard reuse, pre-allocated object names, the SQLite
writer queue, the DUL wake-up pipe, and a storage write failing beside the index work."""

from __future__ import annotations

import gc
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from dicom_node import storage as storage_mod
from dicom_node.ingest import _SQLiteWriterQueue
from dicom_node.models import Instance, Rejection
from dicom_node.storage import Storage
from tests.node.conftest import make_ct, store

OBJECT_NAME = re.compile(r"objects/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}\.dcm")


def test_allocated_relpath_is_where_the_bytes_land(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s", min_free_bytes=0)
    rel = st.allocate()
    assert OBJECT_NAME.fullmatch(rel)
    assert not (st.root / rel).exists()  # named, not yet written
    obj = st.write([b"head", b"body"], relpath=rel)
    assert obj.relpath == rel and obj.size == 8
    assert (st.root / rel).read_bytes() == b"headbody"
    assert obj.sha256 == hashlib.sha256(b"headbody").hexdigest()
    assert list((st.root / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    "bad",
    ["../outside.dcm", "objects/../../x.dcm", "/etc/passwd", "objects/ab/cd/NOTHEX.dcm", "tmp/" + "a" * 32 + ".dcm"],
)
def test_write_refuses_a_relpath_it_did_not_allocate(tmp_path: Path, bad: str) -> None:
    st = Storage(tmp_path / "s", min_free_bytes=0)
    with pytest.raises(ValueError):
        st.write(b"x", relpath=bad)
    assert list((st.root / "tmp").iterdir()) == []
    assert not (tmp_path / "outside.dcm").exists()


def test_shard_directory_is_reused_then_rotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects fill one shard folder (no mkdir + parent fsync per object) up to SHARD_FILES."""
    monkeypatch.setattr(storage_mod, "SHARD_FILES", 3)
    st = Storage(tmp_path / "s", min_free_bytes=0)
    objs = [st.write(f"object {i}".encode()) for i in range(7)]
    dirs = [str(Path(o.relpath).parent) for o in objs]
    assert all(OBJECT_NAME.fullmatch(o.relpath) for o in objs)
    assert len(set(dirs[0:3])) == 1 and len(set(dirs[3:6])) == 1
    leaf_dirs = {str(p.parent.relative_to(st.root)) for p in (st.root / "objects").rglob("*.dcm")}
    assert leaf_dirs == set(dirs)  # no folder was created beyond the shards used
    for o in objs:
        assert (st.root / o.relpath).is_file()


def test_sqlite_writer_queue_hands_over_between_processes(tmp_path: Path) -> None:
    """Two queues on one database (as two listener processes have) exclude each other via flock."""
    db = str(tmp_path / "index.db")
    first, second = _SQLiteWriterQueue(db), _SQLiteWriterQueue(db)
    order: list[str] = []
    entered = threading.Event()

    def other() -> None:
        with second:
            order.append("second")

    with first:
        t = threading.Thread(target=other)
        t.start()
        entered.wait(0.3)  # give the other writer time to block on the lock
        assert t.is_alive(), "the second writer got in while the first held the lock"
        order.append("first")
    t.join(10)
    assert order == ["first", "second"]
    assert first.busy() is False and second.busy() is False


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_associations_work_and_release_their_sockets(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'i.db'}")
    node = start_node(settings, completion=False)
    assert store(node.port, [make_ct()])[0].Status == 0  # warm: pools, writer threads, caches
    gc.collect()
    before = _open_fds()
    for _ in range(5):
        statuses = store(node.port, [make_ct(instance_number=i) for i in range(3)])
        assert [s.Status for s in statuses] == [0, 0, 0]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gc.collect()
        if _open_fds() <= before + 2:
            break
        time.sleep(0.1)
    assert _open_fds() <= before + 2, "sockets of ended associations stay open"
    with Session(node.engine) as s:
        assert len(s.exec(select(Instance)).all()) == 16


def test_failed_storage_write_is_refused_and_indexes_nothing(
    make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    """When moving the received file into storage fails, no row commits and no file stays."""
    settings = make_settings(f"sqlite:///{tmp_path / 'i.db'}")
    node = start_node(settings, completion=False)
    root = tmp_path / "storage"
    shard = root / Path(node.listener.ingest.storage.allocate()).parent  # where the next objects go
    moved = shard.with_name("moved")
    shard.rename(moved)
    shard.write_bytes(b"")  # a file where the shard folder should be: a real ENOTDIR on rename()
    try:
        status = store(node.port, [make_ct()])[0]
    finally:
        shard.unlink()
        moved.rename(shard)
    assert status.Status == 0xA700 and "write failed" in status.ErrorComment
    with Session(node.engine) as s:
        assert s.exec(select(Instance)).all() == []
        assert [r.reason for r in s.exec(select(Rejection)).all()] == ["storage_error"]
    assert [p for p in (root / "objects").rglob("*") if p.is_file()] == []
    assert store(node.port, [make_ct()])[0].Status == 0  # and it recovers


def test_received_files_land_in_the_storage_tmp_folder(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    """While a listener runs, pynetdicom's chunked receive writes into storage/tmp/ (same
    filesystem as objects/: a rename, not a copy); the previous temp folder comes back at stop."""
    import tempfile

    before = tempfile.gettempdir()
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}"), completion=False)
    assert Path(tempfile.gettempdir()) == (tmp_path / "storage" / "tmp").resolve()
    assert store(node.port, [make_ct()])[0].Status == 0
    node.stop(1)
    assert tempfile.gettempdir() == before
