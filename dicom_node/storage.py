"""Durable object storage for received and produced DICOM files.

Every object is written to `root/tmp/<uuid>.tmp`, fsynced, atomically renamed to
`root/objects/<aa>/<bb>/<uuid4 hex>.dcm` and its directory fsynced, so a crash leaves either
the whole object or nothing (a temp file, swept at start-up). File names come from a fresh
UUID, never from a received value (UID, PatientID...), so hostile values cannot reach a path.

Cost per object: two fsyncs (file, then its directory). Received instances arrive as files in
`tmp/` (pynetdicom's chunked receive) and are moved in with `place`: one fdatasync per file,
and the directory fsync shared by every object of an index commit batch. The `<aa>/<bb>` shard directory is
not derived from the name: a writer fills one shard with up to SHARD_FILES objects before it
picks a fresh random one. Deriving it from a random name made almost every object create a
new directory, which cost a mkdir plus a third fsync (of the parent) -- the slowest step of
a C-STORE on an ext4 VM disk.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class StorageFull(OSError):
    """Writing would leave less free disk than `min_free_bytes`."""


@dataclass(frozen=True)
class StoredObject:
    relpath: str  # "objects/ab/cd/<uuid hex>.dcm", relative to the storage root
    sha256: str
    size: int
    write_s: float = 0.0  # seconds in write() calls (hash included)
    fsync_s: float = 0.0  # seconds in the file fsync, rename and directory fsync


_ALLOCATED = re.compile(r"objects/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}\.dcm")

# Objects per shard directory before a writer moves on (65,536 shards x 2,000 = 131 M objects
# before shards fill beyond that; ext4 handles far larger directories anyway).
SHARD_FILES = 2_000


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or create inside it is durable (the entry, not the file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage:
    def __init__(self, root: Path | str, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self.min_free_bytes = min_free_bytes
        self.tmp_dir = self.root / "tmp"
        self.objects_dir = self.root / "objects"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._crash_at = os.environ.get("UNIMEDVL_CRASH_AT")
        self._shard: Path | None = None
        self._shard_left = 0
        self._ensure_top_level()

    def _ensure_top_level(self) -> None:
        """Create the 256 first-level directories once, so a new object costs at most one new directory."""
        if (self.objects_dir / "ff").is_dir():
            return
        for i in range(256):
            (self.objects_dir / f"{i:02x}").mkdir(exist_ok=True)
        fsync_dir(self.objects_dir)
        fsync_dir(self.root)

    # ------------------------------------------------------------------ checks

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_free(self, n_bytes: int) -> None:
        """Raise StorageFull if writing `n_bytes` would leave less than min_free_bytes free."""
        free = self.free_bytes()
        if free - n_bytes < self.min_free_bytes:
            raise StorageFull(
                f"free disk {free} B - {n_bytes} B would fall below min_free_bytes {self.min_free_bytes} B"
            )

    def sweep_temp(self) -> int:
        """Remove leftovers of interrupted writes. Call once at start-up, before any writer runs."""
        removed = 0
        for p in self.tmp_dir.iterdir():
            if p.is_file() or p.is_symlink():
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    def sweep_stale_temp(self, older_than_s: float) -> int:
        """Remove temp files not written to for `older_than_s` seconds while running: a file of a
        transfer in progress is written at least every PDU, so these are leftovers (pynetdicom
        leaves the file of a C-STORE request it discards as invalid)."""
        removed = 0
        cutoff = time.time() - older_than_s
        for p in self.tmp_dir.iterdir():
            try:
                if p.is_file() and p.stat().st_mtime <= cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:  # renamed into objects/ meanwhile
                continue
        return removed

    # ------------------------------------------------------------------ paths

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored object; refuses anything outside the storage root."""
        if not relpath or "\x00" in relpath:
            raise ValueError("invalid storage path")
        p = (self.root / relpath).resolve()
        if p == self.root or not p.is_relative_to(self.root):
            raise ValueError("storage path escapes the storage root")
        return p

    def _object_dir(self) -> Path:
        """The shard directory for the next object: the current one until it has taken SHARD_FILES."""
        with self._lock:
            if self._shard is None or self._shard_left <= 0:
                pick = uuid.uuid4().hex  # random, never from a received value
                d = self.objects_dir / pick[:2] / pick[2:4]
                if not d.is_dir():
                    d.mkdir(parents=True, exist_ok=True)
                    # The new directory's entry must survive a crash as well.
                    fsync_dir(d.parent)
                self._shard, self._shard_left = d, SHARD_FILES
            self._shard_left -= 1
            return self._shard

    # ------------------------------------------------------------------ write

    def allocate(self) -> str:
        """A fresh relpath for `write(..., relpath=...)`: names an object before its bytes exist.

        Lets a caller prepare the index row while the bytes are still being written; the row must
        not commit before `write` has returned.
        """
        return f"{self._object_dir().relative_to(self.root).as_posix()}/{uuid.uuid4().hex}.dcm"

    def write(
        self, data: bytes | bytearray | memoryview | Iterable[bytes], *, relpath: str | None = None
    ) -> StoredObject:
        """Store `data` (bytes or an iterable of chunks) durably; returns where and its sha256.

        `relpath`, if given, must come from `allocate()`; otherwise a new one is picked.
        """
        chunks: Iterable[bytes]
        if isinstance(data, bytes | bytearray | memoryview):
            chunks = (data,)
            self.check_free(len(data))
        else:
            chunks = data
            self.check_free(0)
        if relpath is None:
            name = uuid.uuid4().hex
            final_dir = None
        else:
            if not _ALLOCATED.fullmatch(relpath):
                raise ValueError("relpath was not allocated by this storage")
            final_dir = self.root / relpath.rsplit("/", 1)[0]
            name = relpath.rsplit("/", 1)[1][:-4]
        tmp = self.tmp_dir / f"{name}.tmp"
        digest = hashlib.sha256()
        size = 0
        try:
            # Raw fd writes: no buffered-file layer copying 512 KiB slices once more.
            t0 = time.perf_counter()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                for chunk in chunks:
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    size += len(chunk)
                t1 = time.perf_counter()
                os.fdatasync(fd)  # data and size; other metadata (times) need not be durable
            finally:
                os.close(fd)
            if final_dir is None:
                final_dir = self._object_dir()
            final = final_dir / f"{name}.dcm"
            os.replace(tmp, final)
            fsync_dir(final_dir)
            t2 = time.perf_counter()
            self.crash_point("after_rename")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredObject(
            relpath=final.relative_to(self.root).as_posix(),
            sha256=digest.hexdigest(),
            size=size,
            write_s=t1 - t0,
            fsync_s=t2 - t1,
        )

    @staticmethod
    def sync_file(path: Path | str) -> None:
        """fdatasync of a file: its data and size are durable (other metadata, times, need not be)."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def place(self, src: Path | str, relpath: str, *, synced: bool = False) -> Path:
        """Make a received file (in `tmp/`, written by pynetdicom) the object `relpath`.

        fdatasync of the file, then an atomic rename into its shard directory; returns that
        directory, whose fsync (making the new entry durable) the caller does once per batch of
        objects before any row pointing at them commits (dicom_node/group_commit.py). A file on
        another filesystem is copied into `tmp/` first (kernel-side copy, bounded memory).
        The file is gone from `src` afterwards, whatever the outcome. `synced`: the caller did
        the `sync_file` already (beside its checks).
        """
        if not _ALLOCATED.fullmatch(relpath):
            raise ValueError("relpath was not allocated by this storage")
        src = Path(src)
        final = self.root / relpath
        if not synced:
            self.sync_file(src)
        try:
            os.replace(src, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                src.unlink(missing_ok=True)
                raise
            tmp = self.tmp_dir / f"{final.stem}.tmp"
            try:
                shutil.copyfile(src, tmp)
                self.sync_file(tmp)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finally:
                src.unlink(missing_ok=True)
        self.crash_point("after_rename")
        return final.parent

    # ------------------------------------------------------------------ reconciliation

    def objects_since(self, since: float | None) -> list[str]:
        """Relpaths of stored objects in shard directories modified at or after `since` (epoch s).

        A directory's mtime moves when an object is renamed into it, so with `since` = the last
        reconciliation (minus a margin) only the shards written since then are listed.
        """
        found: list[str] = []
        for top in sorted(self.objects_dir.iterdir()):
            if not top.is_dir():
                continue
            for shard in sorted(top.iterdir()):
                if not shard.is_dir() or (since is not None and shard.stat().st_mtime < since):
                    continue
                for p in shard.iterdir():
                    rel = p.relative_to(self.root).as_posix()
                    if _ALLOCATED.fullmatch(rel):
                        found.append(rel)
        return found

    def quarantine(self, relpath: str, reason: str) -> Path:
        """Move an object out of `objects/` into `quarantine/` with a `.reason` file beside it."""
        src = self.path(relpath)
        qdir = self.root / "quarantine"
        qdir.mkdir(exist_ok=True)
        dst = qdir / src.name
        (qdir / f"{src.name}.reason").write_text(reason + "\n")
        os.replace(src, dst)
        fsync_dir(qdir)
        fsync_dir(src.parent)
        return dst

    def crash_point(self, name: str) -> None:
        """Fault injection for crash tests: SIGKILL this process at `name` when
        UNIMEDVL_CRASH_AT names it (never set in production)."""
        if self._crash_at == name:
            os.kill(os.getpid(), signal.SIGKILL)

    def remove(self, relpath: str) -> None:
        self.path(relpath).unlink(missing_ok=True)
