"""Workers die with their parent: no orphaned worker trees holding memory (and GPU memory).

`unimedvl serve` starts its embedded worker in a session of its own (so stopping it reaches
its pool child too), which means a SIGKILL of `serve` does not reach the worker: it used to
keep running under PID 1 and consume jobs. Likewise a Celery pool child whose Celery main
process is killed keeps running. `watch_parent` closes both holes: a daemon thread compares
`os.getppid()` with the parent the process started under, every `interval` seconds, and ends
the process (SIGKILL to itself: a crash, exactly what happened to its parent) once it has been
re-parented. A job cut short that way recorded nothing; its lease expires and it runs again.
Polling getppid() is portable and, unlike PR_SET_PDEATHSIG, is not tied to the thread that
forked the child (Celery's pool supervisor thread forks replacement children).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("dicom_node.jobs.lifeline")

PARENT_ENV = "UNIMEDVL_WORKER_PARENT_PID"  # set by start_embedded_worker: the serve process
INTERVAL_S = 0.5


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(
    parent_pid: int | None = None, *, interval: float = INTERVAL_S, on_death: Callable[[], None] = _die, what: str = ""
) -> threading.Thread | None:
    """Start a daemon thread that calls `on_death` once this process's parent is not `parent_pid`.

    parent_pid: the PID the parent must keep (default: the current parent). None is returned,
    and nothing watched, when the parent is already gone (PID 1 or a changed PID): then the
    caller decides. Units: seconds. Runs until the process ends.
    """
    expected = os.getppid() if parent_pid is None else parent_pid
    if expected <= 1 or os.getppid() != expected:
        if os.getppid() != expected:
            log.critical("%s: parent process %s is already gone; stopping", what or "worker", expected)
            on_death()
        return None

    def run() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            if os.getppid() != expected:
                log.critical("%s: parent process %s died; stopping this process", what or "worker", expected)
                on_death()
                return

    t = threading.Thread(target=run, name="parent-watch", daemon=True)
    t.start()
    return t


def watch_parent_from_env(what: str = "embedded worker") -> threading.Thread | None:
    """`watch_parent` for the PID in UNIMEDVL_WORKER_PARENT_PID, when set (embedded workers)."""
    value = os.environ.get(PARENT_ENV, "").strip()
    if not value.isdigit():
        return None
    return watch_parent(int(value), what=what)
