"""A worker process's state: its settings, DB engine, storage (or the node's API) and the warm model.

Celery's pool child builds one `WorkerContext` on first use (`current_context`) and keeps it
for its life: the model loads once, in a background thread right after the child starts
(`warm_up_in_background`), or on the first job. `WorkerContext.run(job_id)` runs one job
through `dicom_node.jobs.runner.execute_job` (claim, lease, output transaction) with the
model work done by `inference.pipelines.run_task` (datasets in, datasets out). Sources and
outputs go through the shared storage path (`runner.LocalIO`), or with `[worker] node_url`
through the node's HTTP API (`dicom_node.jobs.remote.RemoteIO`, no shared disk).

The settings come from `set_settings` (called by `run_worker` before the pool forks) or, for a
plain `celery -A dicom_node.jobs.celery_app worker`, from `UNIMEDVL_CONFIG` (or
./unimedvl.toml, or the embedded defaults) plus `UNIMEDVL_*` environment overrides.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset

from dicom_node.db import make_engine
from dicom_node.heap import freeze_long_lived
from dicom_node.jobs.runner import JobIO, LocalIO, Output, execute_job, failure_reason, job_destinations
from dicom_node.jobs.source_cache import SourceCache
from dicom_node.storage import Storage

log = logging.getLogger("dicom_node.jobs.context")

CONFIG_ENV = "UNIMEDVL_CONFIG"
DEVICE_ENV = "UNIMEDVL_WORKER_DEVICE"


def _resolve_device(device: str) -> str:
    if device in ("", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class WorkerContext:
    """Per-process state of a worker: settings, DB engine, storage and the warm model."""

    settings: Any
    device: str | None = None
    parts: str = "all"

    def __post_init__(self) -> None:
        self.db = make_engine(self.settings.database.url)
        # Local-path mode (default): the node's storage path is shared. With [worker] node_url the
        # worker never touches a storage path: sources and outputs go over the node's HTTP API.
        self.job_io: JobIO
        w = getattr(self.settings, "worker", None)
        if w is not None and w.node_url:
            from dicom_node.jobs.remote import RemoteIO

            self.storage: Storage | None = None
            self.job_io = RemoteIO(w.node_url, w.node_token, w.timeout_seconds, w.tls_ca, cache=SourceCache())
            log.info("remote worker: instances and outputs through the node's API (no shared disk)")
        else:
            self.storage = Storage(self.settings.storage.path, self.settings.storage.min_free_bytes)
            self.job_io = LocalIO(self.storage, self.destinations, SourceCache())
        self._engine: Any = None
        self._engine_error: BaseException | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ model

    def engine(self) -> Any:
        """The engine, loaded on first use and kept for the life of the process.

        Raises what `inference.engine.load_engine` raises for a bad checkpoint (FileNotFoundError,
        ValueError naming the file or tensor); the next call tries again.
        """
        with self._lock:
            if self._engine is None:
                self._engine = self._load()
            return self._engine

    def _load(self) -> Any:
        from inference.engine.api import load_engine

        m = self.settings.model
        device = _resolve_device(self.device or os.environ.get(DEVICE_ENV) or m.device)
        dtype = None if m.dtype in ("", "auto") else m.dtype
        started = time.monotonic()
        engine = load_engine(m.path, device=device, dtype=dtype, parts=self.parts, attention=m.attention)
        if m.encoders != "torch":
            from inference.onnx.accelerate import accelerate_engine

            accelerate_engine(engine, m.encoders, m.cache_dir)
        log.info("model loaded in %.1f s on %s (%s)", time.monotonic() - started, device, engine.info.get("model_name"))
        return engine

    def warm_up_in_background(self) -> None:
        def work() -> None:
            try:
                self.engine()
            except Exception:
                log.exception("loading the model failed (the first job handed to this worker stops it)")
                return
            try:
                log.info("result writers warmed up in %.1f s", warm_up_writers())
            except Exception as exc:  # only the first job's speed is at stake
                log.warning("warming up the result writers failed (%s); the first job pays it", type(exc).__name__)
            log.info("%d long-lived objects exempted from full garbage collections", freeze_long_lived())

        threading.Thread(target=work, name="model-warm-up", daemon=True).start()

    # ------------------------------------------------------------------ jobs

    def destinations(self, job: Any) -> list[str]:
        return job_destinations([d.name for d in self.settings.destinations], job)

    def run_pipeline(self, job: Any, datasets: list[Dataset]) -> tuple[list[Output], str | None, dict[str, Any] | None]:
        from inference.pipelines import run_task

        engine = self.engine()
        out = run_task(job.kind, datasets, job.params, engine)
        outputs = [Output(o.dataset, o.kind, o.source_series_uid) for o in out.objects]
        return outputs, out.summary, dict(out.model) or dict(engine.info)

    def run(self, job_id: int) -> str:
        """Run job `job_id` (dicom_node.jobs.runner.execute_job); returns its outcome word.

        A job's own failure is recorded on its row, never raised. When the model cannot be loaded
        this raises celery's Reject (message re-queued) and asks this worker to stop.
        """
        try:
            self.engine()
        except Exception as exc:
            # A worker that cannot load its model must not fail the studies it is handed: leave
            # the job untouched (no attempt counted), put the message back and stop this worker,
            # so the operator (or systemd/Kubernetes restarting it) sees the error.
            log.critical("the model cannot be loaded (%s); this worker stops without taking jobs", failure_reason(exc))
            _stop_worker_process()
            from celery.exceptions import Reject

            raise Reject(f"model not loadable: {failure_reason(exc)}", requeue=True) from None
        return execute_job(self.db, self.job_io, job_id, self.run_pipeline, self.destinations)


def warm_up_writers() -> float:
    """Write a report SR, a SEG and a TID 1500 SR for a 2-slice synthetic CT and throw them away;
    returns the seconds it took.

    A worker's first job otherwise pays ~1.5 s that no later job pays (measured on a 2-core
    VM): importing the pipelines, writers and highdicom, and highdicom loading its tables of
    the standard (JSON) on first use. Nothing is stored or sent."""
    started = time.monotonic()
    import numpy as np

    from dicom_node.synthetic import ct_series
    from inference.pipelines import provenance_from_engine
    from sr_writers import (
        ReportResult,
        Segment,
        SegmentationResult,
        write_measurements_sr,
        write_report_sr,
        write_seg,
    )

    sources = ct_series(2, 16, 16, patient_name="WARM^UP")
    provenance = provenance_from_engine({})
    write_report_sr(ReportResult(findings="warm-up"), sources, provenance)
    result = SegmentationResult(
        segments=[Segment(label="warm-up")],
        masks={str(ds.SOPInstanceUID): np.ones((16, 16), dtype=bool) for ds in sources},
    )
    seg = write_seg(result, sources, provenance)
    write_measurements_sr(result, seg, sources, provenance)
    return time.monotonic() - started


def _stop_worker_process() -> None:
    """Ask the Celery main process to shut down (warm): the pool parent, or this process with the solo pool."""
    try:
        from billiard.process import current_process

        in_pool_child = current_process().name.startswith("ForkPoolWorker")
    except Exception:
        in_pool_child = False
    os.kill(os.getppid() if in_pool_child else os.getpid(), signal.SIGTERM)


_context: WorkerContext | None = None
_context_pid: int | None = None
_context_lock = threading.Lock()
_settings: Any = None


def set_settings(settings: Any, device: str | None = None, parts: str = "all") -> None:
    """Settings for the contexts this process (and its forked children) will build."""
    global _settings, _context, _context_pid
    _settings = (settings, device, parts)
    _context = None
    _context_pid = None


def current_context() -> WorkerContext:
    """This process's context, built on first use (a forked child builds its own DB pool).

    Raises dicom_node.config.ConfigError when no settings were set and the config file is bad.
    """
    global _context, _context_pid
    with _context_lock:
        if _context is None or _context_pid != os.getpid():
            if _settings is not None:
                settings, device, parts = _settings
            else:
                from dicom_node.config import load_config

                settings, device, parts = load_config(os.environ.get(CONFIG_ENV) or None), None, "all"
            _context = WorkerContext(settings, device=device, parts=parts)
            _context_pid = os.getpid()
        return _context
