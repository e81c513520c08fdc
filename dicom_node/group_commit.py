"""Group commit of the index: one committer thread, one transaction for many instances.

Every C-STORE handler thread (one per association) hands its instance's index work to
`GroupCommit.submit` and waits for that work's commit before the success status goes out, so
durability is unchanged: an acknowledged instance is a durable file and a committed row. The
committer takes whatever has queued up while the previous transaction committed (nothing is
held back on purpose unless `window_s` is set), fsyncs each directory that received a renamed
object once for the whole batch (the object's directory entry must be durable before the row
that points at it), and runs the batch in one transaction: one commit and one WAL/fsync on
SQLite or PostgreSQL instead of one per instance. If the batch transaction fails, each item is
retried in a transaction of its own, so one bad item fails alone.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from dicom_node.logs import kv
from dicom_node.storage import fsync_dir

log = logging.getLogger("dicom_node.group_commit")

# apply(conn, created, item) -> result; `created` collects ids inserted by this transaction.
Apply = Callable[[Connection, dict[Any, Any], Any], Any]

RETRIES = 4  # per item, when a concurrent writer (another process) wins a race or a deadlock


@dataclass
class _Request:
    item: Any
    sync_dir: Path | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    waited_s: float = 0.0


@dataclass
class CommitStats:
    batches: int = 0
    items: int = 0
    largest: int = 0
    dir_fsyncs: int = 0

    @property
    def rows_per_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class GroupCommit:
    def __init__(
        self,
        engine: Engine,
        apply: Apply,
        *,
        lock: Any = None,
        on_commit: Callable[[dict[Any, Any]], None] | None = None,
        max_batch: int = 64,
        window_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.apply = apply
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.on_commit = on_commit
        self.max_batch = max_batch
        self.window_s = window_s
        self.stats = CommitStats()
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def submit(self, item: Any, sync_dir: Path | None = None) -> Any:
        """Commit `item` (with the fsync of `sync_dir` first); its result, or its exception."""
        if self._closed:
            raise RuntimeError("group commit closed")
        self._ensure_thread()
        req = _Request(item, sync_dir)
        self._queue.put(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)

    # ------------------------------------------------------------------ committer thread

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    t = threading.Thread(target=self._loop, name="index-committer", daemon=True)
                    t.start()
                    self._thread = t

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    left = deadline - time.monotonic()
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self._run(batch)
            except BaseException as exc:  # never leave a waiter hanging
                for r in batch:
                    if not r.done.is_set():
                        r.error = exc
                        r.done.set()
            if stop:
                return

    def _run(self, batch: list[_Request]) -> None:
        dirs = {r.sync_dir for r in batch if r.sync_dir is not None}
        try:
            for d in dirs:
                fsync_dir(d)
        except OSError as exc:
            for r in batch:
                r.error = exc
                r.done.set()
            return
        self.stats.dir_fsyncs += len(dirs)
        if len(batch) > 1:
            try:
                results = self._transaction([r.item for r in batch])
            except Exception as exc:
                log.info("group commit: batch failed, one by one", extra=kv(size=len(batch), error=type(exc).__name__))
            else:
                self._count(len(batch))
                for r, res in zip(batch, results, strict=True):
                    r.result = res
                    r.done.set()
                return
        for r in batch:
            self._one(r)

    def _one(self, r: _Request) -> None:
        for attempt in range(RETRIES):
            try:
                r.result = self._transaction([r.item])[0]
            except (IntegrityError, OperationalError) as exc:
                # A concurrent writer (another listener process, the completion monitor) inserted
                # the same patient/study/series/instance first, or PostgreSQL picked us as a deadlock
                # victim: the retry sees its committed row.
                if attempt == RETRIES - 1:
                    r.error = exc
                    break
                log.info("index retry", extra=kv(attempt=attempt + 1, error=type(exc).__name__))
                continue
            except Exception as exc:
                r.error = exc
            else:
                self._count(1)
            break
        r.done.set()

    def _transaction(self, items: list[Any]) -> list[Any]:
        created: dict[Any, Any] = {}
        with self.lock, self.engine.begin() as conn:
            results = [self.apply(conn, created, item) for item in items]
        if self.on_commit is not None:
            self.on_commit(created)
        return results

    def _count(self, n: int) -> None:
        self.stats.batches += 1
        self.stats.items += n
        self.stats.largest = max(self.stats.largest, n)
