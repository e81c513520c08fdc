"""Celery's prefork pool, with pool children that never wait for a job while holding a lock.

Why: a broker transport without asynchronous I/O (the embedded SQLAlchemy transport; any kombu
virtual transport) runs Celery's worker without its event loop, and Celery then uses billiard's
blocking `Pool`. Its children share ONE inqueue and read it through `SimpleQueue.get_payload`,
which takes the queue's multiprocessing lock (a SemLock) and then blocks in `recv_bytes` until a
job arrives: an idle child holds that lock all the time. SIGKILL it (OOM killer, an operator, a
crash in native code) and the lock is never released, so the replacement child blocks forever in
`SemLock.__enter__`: jobs stay queued and the worker looks alive. With RabbitMQ Celery uses its
event loop and `AsynPool` (one pipe per child, no shared read lock), which is unaffected.

Here a child waits for a job with `poll` (no lock), and takes the lock only to read a message
that is already there, re-checking that it still is (another child may have taken it), so the
lock is held for microseconds, never while idle. `TaskPool` is selected through the
`worker_pool` setting (dicom_node.jobs.celery_app.configure), so `celery -A
dicom_node.jobs.celery_app worker` gets it too. Reference: billiard/pool.py `Worker.
_make_recv_method` and billiard/queues.py `SimpleQueue.get_payload` (billiard 4.x).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from billiard import pool as billiard_pool
from billiard.common import pickle_loads
from celery.concurrency import prefork


class Worker(billiard_pool.Worker):
    """A pool child that holds the shared inqueue's read lock only while reading a ready message."""

    def _make_recv_method(self, conn: Any) -> Callable[[float], tuple[bool, Any]]:
        reader = getattr(conn, "_reader", None)
        lock = getattr(conn, "_rlock", None)
        if reader is None or lock is None:
            return super()._make_recv_method(conn)

        def recv(timeout: float, loads: Callable[[bytes], Any] = pickle_loads) -> tuple[bool, Any]:
            if not reader.poll(timeout):
                return False, None
            if not lock.acquire(True, timeout):
                return False, None  # another child is reading; wait for the next message
            try:
                if not reader.poll(0):  # that child took it
                    return False, None
                return True, loads(reader.recv_bytes())
            finally:
                lock.release()

        return recv


class BlockingPool(billiard_pool.Pool):
    """billiard's blocking pool with `Worker` above as its child."""

    Worker = Worker


class TaskPool(prefork.TaskPool):
    """Celery's prefork TaskPool; without an event loop it uses `BlockingPool` above."""

    BlockingPool = BlockingPool


POOL = f"{__name__}:TaskPool"
