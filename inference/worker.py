"""The GPU worker: a Celery worker that runs `unimedvl.run_job` with the model kept warm.

- One worker process per GPU: `run_worker` starts Celery's prefork pool with ONE child. The
  child loads the engine once (in a background thread right after it starts, or on its
  first job) and keeps it for its whole life; the parent only talks to the broker, so broker
  heartbeats keep flowing while a long generation runs (with the solo pool they stop, see
  celery#3430). CUDA is never initialised in the parent, so forking is safe.
- `--device cuda:N` sets CUDA_VISIBLE_DEVICES=N before anything touches CUDA; the model then
  runs on cuda:0 of that single visible GPU.
- `celery -A inference.celery_app worker` works too: the tasks read `UNIMEDVL_CONFIG` (or
  ./unimedvl.toml, or the embedded defaults) plus `UNIMEDVL_*` environment overrides.
- `start_embedded_worker(settings)` runs the same worker as a child process of
  `unimedvl serve` (a real worker on the embedded broker, not Celery's eager mode).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("inference.worker")

CONFIG_ENV = "UNIMEDVL_CONFIG"
DEVICE_ENV = "UNIMEDVL_WORKER_DEVICE"


def pin_device(device: str | None) -> str | None:
    """`cuda:N` -> CUDA_VISIBLE_DEVICES=N and "cuda:0"; other values unchanged. Call before CUDA starts."""
    if device is None:
        return None
    m = re.fullmatch(r"cuda:(\d+)", device.strip())
    if m:
        os.environ["CUDA_VISIBLE_DEVICES"] = m.group(1)
        return "cuda:0"
    return device.strip()


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
        from dicom_node.db import make_engine
        from dicom_node.storage import Storage

        self.db = make_engine(self.settings.database.url)
        self.storage = Storage(self.settings.storage.path, self.settings.storage.min_free_bytes)
        self._engine: Any = None
        self._engine_error: BaseException | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ model

    def engine(self) -> Any:
        """The engine, loaded on first use and kept for the life of the process."""
        with self._lock:
            if self._engine is None:
                self._engine = self._load()
            return self._engine

    def _load(self) -> Any:
        import time

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

        threading.Thread(target=work, name="model-warm-up", daemon=True).start()

    # ------------------------------------------------------------------ jobs

    def destinations(self, job: Any) -> list[str]:
        configured = [d.name for d in self.settings.destinations]
        wanted = job.params.get("destinations")
        return list(wanted) if wanted else configured

    def run_pipeline(self, job: Any, datasets: list[Any]) -> tuple[list[Any], str | None, dict[str, Any] | None]:
        from dicom_node.jobs.runner import Output
        from inference.pipelines import run_task

        engine = self.engine()
        out = run_task(job.kind, datasets, job.params, engine)
        outputs = [Output(o.dataset, o.kind, o.source_series_uid) for o in out.objects]
        return outputs, out.summary, dict(out.model) or dict(engine.info)

    def run(self, job_id: int) -> str:
        from dicom_node.jobs.runner import execute_job, failure_reason

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
        return execute_job(self.db, self.storage, job_id, self.run_pipeline, self.destinations)


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
    """This process's context, built on first use (a forked child builds its own DB pool)."""
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


def queues_for(kinds_or_queues: Sequence[str] | None) -> list[str]:
    """Queue names from task kinds or queue names (None: both queues)."""
    from inference.celery_app import BATCH_QUEUE, GENERATION_QUEUE, TASK_QUEUES, UNDERSTANDING_QUEUE

    if not kinds_or_queues:
        return [UNDERSTANDING_QUEUE, GENERATION_QUEUE]
    out: list[str] = []
    for q in kinds_or_queues:
        name = TASK_QUEUES.get(q, q)
        if name not in (UNDERSTANDING_QUEUE, GENERATION_QUEUE, BATCH_QUEUE):
            raise ValueError(f"unknown queue or task kind {q!r}: use understanding, generation, batch or a task kind")
        if name not in out:
            out.append(name)
    return out


_QUEUE_ALIASES = {
    "understanding": "unimedvl.understanding",
    "generation": "unimedvl.generation",
    "batch": "unimedvl.batch",
}


def run_worker(
    settings: Any,
    device: str | None = None,
    queues: Sequence[str] | None = None,
    concurrency: int = 1,
    *,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> None:
    """Run a Celery worker in the foreground until SIGTERM/SIGINT (warm shutdown: finishes the job)."""
    from inference.celery_app import UNDERSTANDING_QUEUE, app, configure, resolve_broker_url

    device = pin_device(device)
    names = queues_for([_QUEUE_ALIASES.get(q, q) for q in queues] if queues else None)
    parts = "understanding" if names == [UNDERSTANDING_QUEUE] else "all"
    configure(app, resolve_broker_url(settings.broker.url, settings.base_dir))
    from dicom_node.jobs.settings import job_settings

    app.conf.task_time_limit = job_settings(settings).time_limit_seconds
    set_settings(settings, device, parts)
    if settings.config_path is not None:
        os.environ.setdefault(CONFIG_ENV, str(settings.config_path))
    import inference.tasks  # noqa: F401  (registers unimedvl.run_job)

    name = hostname or f"unimedvl-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--hostname={name}",
        f"--queues={','.join(names)}",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    log.info("worker %s: queues %s, concurrency %d, device %s", name, ",".join(names), concurrency, device or "auto")
    app.worker_main(argv)


def _settings_env(settings: Any) -> dict[str, str]:
    """The resolved locations, so the child sees exactly what the parent resolved."""
    return {
        "UNIMEDVL_DATABASE__URL": settings.database.url,
        "UNIMEDVL_STORAGE__PATH": str(settings.storage.path),
        "UNIMEDVL_BROKER__URL": settings.broker.url,
    }


def start_embedded_worker(
    settings: Any,
    *,
    device: str | None = None,
    queues: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    stdout: Any = None,
    stderr: Any = None,
) -> subprocess.Popen:
    """Start `python -m inference.worker` for `unimedvl serve`; stop it with `stop_worker`."""
    cmd = [sys.executable, "-m", "inference.worker"]
    if settings.config_path is not None:
        cmd += ["--config", str(settings.config_path)]
    if device:
        cmd += ["--device", device]
    for q in queues or ():
        cmd += ["--queue", q]
    child_env = {**os.environ, **_settings_env(settings), **(env or {})}
    return subprocess.Popen(
        cmd,
        cwd=str(settings.base_dir),
        env=child_env,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,  # its own process group: stop_worker reaches the pool child too
    )


def stop_worker(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM to the worker (warm shutdown: the running job finishes), then SIGKILL of its group.

    Killing is safe: an unfinished job recorded nothing and is re-queued when its lease expires.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)  # the Celery main process; it stops its pool child itself
    except ProcessLookupError:
        return proc.wait()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(10)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m inference.worker", description="UniMedVL GPU worker")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (pins GPU N)")
    parser.add_argument("--queue", action="append", default=None, help="understanding, generation or a task kind")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    from dicom_node.config import ConfigError, load_config

    try:
        settings = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("highdicom", "alembic"):  # per-object INFO lines of libraries, not job events
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from dicom_node.logs import guard_phi

    guard_phi(settings.node.log_phi)  # library warnings and exception texts can quote patient data
    run_worker(settings, args.device, args.queue, args.concurrency, loglevel=args.loglevel)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the pool child's tasks read the
    # settings from `inference.worker`'s globals, which set_settings must be writing to.
    from inference import worker as _worker

    _worker.main()
