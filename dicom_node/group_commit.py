"""Group commit of the index: one transaction for many instances, committed by a handler thread.

Every C-STORE handler thread (one per association) hands its instance's index work to
`GroupCommit.submit` and waits for that work's commit before the success status goes out, so
durability is unchanged: an acknowledged instance is a durable file and a committed row. The
submitter that finds nobody committing becomes the leader (no committer thread: with one
association there is no thread hand-off at all). It takes whatever has queued up while the
previous transaction committed (nothing is held back on purpose unless `window_s` is set),
fsyncs each directory that received a renamed object once for the whole batch, beside the
batch's statements, and commits only once that fsync returned (the object's directory entry
must be durable before the row that points at it): one commit and one WAL/fsync on SQLite or
PostgreSQL instead of one per instance. If the batch transaction fails, each item is retried
in a transaction of its own, so one bad item fails alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from dicom_node.logs import kv
from dicom_node.storage import fsync_dir

log = logging.getLogger("dicom_node.group_commit")

# apply(conn, created, item) -> result; `created` collects ids inserted by this transaction.
Apply = Callable[[Connection, "Created", Any], Any]
# complete(conn, created, results) -> results: runs once per transaction after every apply,
# before COMMIT (work the items share, done once per batch).
Complete = Callable[[Connection, "Created", list[Any]], list[Any]]


class Created(dict[Any, Any]):
    """Ids inserted by one transaction (reported to `on_commit` once it committed), and
    `scratch`: what the transaction's items share (dropped with the transaction)."""

    def __init__(self) -> None:
        super().__init__()
        self.scratch: dict[Any, Any] = {}


RETRIES = 4  # per item, when a concurrent writer (another process) wins a race or a deadlock


@dataclass
class _Request:
    item: Any
    sync_dir: Path | None
    wake: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # result or error is set
    promoted: bool = False  # woken to lead the next batch, not because it finished
    result: Any = None
    error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.error = error
        self.finished = True
        self.wake.set()


class _DirSyncFailed(Exception):
    """The fsync of a batch's directory failed: every item of the batch fails with `error`."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _sync_dirs(dirs: set[Path]) -> None:
    for d in dirs:
        fsync_dir(d)


class _Pending:
    """The requests waiting for a leader; guarded by GroupCommit._mutex."""

    def __init__(self) -> None:
        self.items: deque[_Request] = deque()

    def qsize(self) -> int:
        return len(self.items)


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
    """Leader/follower group commit: no committer thread. The submitter that finds nobody
    committing leads: it takes everything queued (its own item first), commits it, and, once
    its own item is done, hands the lead to the oldest waiter. With one association the handler
    thread commits its own row without any thread hand-off; with many, one wake-up per batch
    passes the lead on, and the waiters of a batch are woken once when it commits."""

    def __init__(
        self,
        engine: Engine,
        apply: Apply,
        *,
        lock: Any = None,
        on_commit: Callable[[dict[Any, Any]], None] | None = None,
        complete: Complete | None = None,
        max_batch: int = 64,
        window_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.apply = apply
        self.complete = complete
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.on_commit = on_commit
        self.max_batch = max_batch
        self.window_s = window_s
        self.stats = CommitStats()
        self._mutex = threading.Lock()
        self._queue = _Pending()
        self._leading = False  # a submitter is committing (guarded by _mutex)
        self._closed = False
        # One worker: batches commit one after another, so at most one directory sync runs.
        self._dir_syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-dir-sync")

    def submit(self, item: Any, sync_dir: Path | None = None) -> Any:
        """Commit `item` (with the fsync of `sync_dir` first); its result, or its exception.

        Blocks until the transaction holding `item` committed (or failed); the calling thread
        may commit other submitters' items meanwhile.
        """
        if self._closed:
            raise RuntimeError("group commit closed")
        req = _Request(item, sync_dir)
        with self._mutex:
            self._queue.items.append(req)
            lead = not self._leading
            self._leading = True
        if lead:
            self._lead(req)
        while not req.finished:
            req.wake.wait()
            req.wake.clear()
            if req.promoted and not req.finished:
                req.promoted = False
                self._lead(req)
        if req.error is not None:
            raise req.error
        return req.result

    def close(self) -> None:
        """Refuse further submissions (items already submitted still commit)."""
        self._closed = True
        self._dir_syncer.shutdown(wait=False)

    # ------------------------------------------------------------------ the leader

    def _lead(self, own: _Request) -> None:
        """Commit batches until `own` is done, then pass the lead on (or give it up)."""
        while True:
            if self.window_s > 0:
                time.sleep(self.window_s)  # let more submitters join this batch
            with self._mutex:
                pending = self._queue.items
                batch = [pending.popleft() for _ in range(min(len(pending), self.max_batch))]
            if batch:
                try:
                    self._run(batch)
                except BaseException as exc:  # never leave a waiter hanging
                    for r in batch:
                        if not r.finished:
                            r.finish(exc)
            with self._mutex:
                if not own.finished and self._queue.items:
                    continue
                nxt = self._queue.items[0] if self._queue.items else None
                if nxt is None:
                    self._leading = False
                else:
                    nxt.promoted = True
            if nxt is not None:
                nxt.wake.set()
            return

    def _run(self, batch: list[_Request]) -> None:
        # The directories' fsync runs beside the batch's statements; the commit waits for it:
        # an entry is durable before the row pointing at it, and neither waits for the other.
        dirs = {r.sync_dir for r in batch if r.sync_dir is not None}
        synced = self._dir_syncer.submit(_sync_dirs, dirs) if dirs else None
        try:
            self._run_synced(batch, synced)
        finally:
            if synced is not None and synced.exception() is None:
                self.stats.dir_fsyncs += len(dirs)

    def _run_synced(self, batch: list[_Request], synced: Future[None] | None) -> None:
        if len(batch) > 1:
            try:
                results = self._transaction([r.item for r in batch], synced)
            except _DirSyncFailed as exc:
                for r in batch:
                    r.finish(exc.error)
                return
            except Exception as exc:
                log.info("group commit: batch failed, one by one", extra=kv(size=len(batch), error=type(exc).__name__))
            else:
                self._count(len(batch))
                for r, res in zip(batch, results, strict=True):
                    r.result = res
                    r.finish()
                return
        for r in batch:
            self._one(r, synced)

    def _one(self, r: _Request, synced: Future[None] | None) -> None:
        for attempt in range(RETRIES):
            try:
                r.result = self._transaction([r.item], synced)[0]
            except _DirSyncFailed as exc:
                r.error = exc.error
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
        r.finish()

    def _transaction(self, items: list[Any], synced: Future[None] | None = None) -> list[Any]:
        created = Created()
        with self.lock, self.engine.begin() as conn:
            results = [self.apply(conn, created, item) for item in items]
            if self.complete is not None:
                results = self.complete(conn, created, results)
            if synced is not None:
                try:
                    synced.result()  # before COMMIT; a failure rolls the batch back
                except OSError as exc:
                    raise _DirSyncFailed(exc) from exc
        if self.on_commit is not None:
            self.on_commit(created)
        return results

    def _count(self, n: int) -> None:
        self.stats.batches += 1
        self.stats.items += n
        self.stats.largest = max(self.stats.largest, n)
