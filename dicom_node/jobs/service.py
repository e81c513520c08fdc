"""The job side of `unimedvl serve` / `unimedvl node`: planner, sweeper and (serve) an embedded worker.

jobs = JobService.from_settings(settings, engine, embedded_worker=True)
jobs.attach(node.monitor)      # before node.start(): completed revisions -> jobs
jobs.start()                   # sweeper thread + worker process (restarted if it exits)
...
jobs.stop()                    # worker warm shutdown (then killed), sweeper stopped
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine

from dicom_node.jobs.planner import Planner, Publisher
from dicom_node.jobs.settings import JobSettings, job_settings
from dicom_node.routing import Rule

log = logging.getLogger("dicom_node.jobs.service")

RESTART_BACKOFF_MIN = 2.0
RESTART_BACKOFF_MAX = 300.0


class JobService:
    def __init__(
        self,
        settings: Any,
        engine: Engine,
        rules: Sequence[Rule],
        *,
        jobs: JobSettings | None = None,
        embedded_worker: bool = False,
        worker_env: dict[str, str] | None = None,
        worker_log: Any = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.publisher = Publisher(settings.broker.url)
        self.planner = Planner(engine, rules, self.publisher, model=settings.model, jobs=jobs or job_settings(settings))
        self.embedded_worker = embedded_worker
        self.worker_env = worker_env
        self.worker_log = worker_log
        self.worker: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._worker_signalled = False  # SIGTERM sent by begin_stop()

    @classmethod
    def from_settings(cls, settings: Any, engine: Engine, **kw: Any) -> JobService:
        from dicom_node.routing import parse_rules

        return cls(settings, engine, parse_rules(settings.rules), **kw)

    def attach(self, monitor: Any) -> None:
        """Subscribe the planner to a CompletionMonitor (register before the monitor starts)."""
        monitor.on_study_complete(self.planner.on_study_complete)

    def start(self) -> None:
        self._stop.clear()
        self.planner.start()
        if self.embedded_worker:
            self._start_worker()
            self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
            self._supervisor.start()

    def begin_stop(self) -> None:
        """First step of a shutdown: the embedded worker stops taking messages now (SIGTERM: Celery's
        warm shutdown, the running job finishes), so jobs planned while the node winds down stay
        queued for the next start instead of keeping the shutdown waiting on a model run."""
        import signal

        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
            self._supervisor = None
        if self.worker is not None and not self._worker_signalled and self.worker.poll() is None:
            try:
                self.worker.send_signal(signal.SIGTERM)
                self._worker_signalled = True
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        from dicom_node.jobs.worker import stop_worker

        self.begin_stop()
        if self.worker is not None:
            # A job cut short here recorded nothing; it is re-queued when its lease expires.
            stop_worker(self.worker, timeout, signalled=self._worker_signalled)
            self.worker = None
        self.planner.stop()
        self.publisher.close()

    def _start_worker(self) -> None:
        from dicom_node.jobs.worker import start_embedded_worker

        self._worker_signalled = False
        self.worker = start_embedded_worker(
            self.settings, env=self.worker_env, stdout=self.worker_log, stderr=self.worker_log
        )
        log.info("embedded worker started (pid %s)", self.worker.pid)

    def _supervise(self) -> None:
        backoff = RESTART_BACKOFF_MIN
        while not self._stop.wait(1.0):
            proc = self.worker
            if proc is None or proc.poll() is None:
                continue
            log.error("embedded worker exited with %s; restarting in %.0f s", proc.returncode, backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)  # a model that cannot load must not spin
            self._start_worker()
