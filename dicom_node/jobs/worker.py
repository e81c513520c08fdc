"""The GPU worker: a Celery worker that runs `unimedvl.run_job` with the model kept warm.

- One worker process per GPU: `run_worker` starts Celery's prefork pool with ONE child. The
  child loads the engine once (in a background thread right after it starts, or on its
  first job) and keeps it for its whole life; the parent only talks to the broker, so broker
  heartbeats keep flowing while a long generation runs (with the solo pool they stop, see
  celery#3430). CUDA is never initialised in the parent, so forking is safe.
- `--device cuda:N` sets CUDA_VISIBLE_DEVICES=N before anything touches CUDA; the model then
  runs on cuda:0 of that single visible GPU.
- `celery -A dicom_node.jobs.celery_app worker` works too: the tasks read `UNIMEDVL_CONFIG` (or
  ./unimedvl.toml, or the embedded defaults) plus `UNIMEDVL_*` environment overrides
  (dicom_node.jobs.context). The app lived in `inference.celery_app` before; it moved here
  because running a job needs the DB and storage, and `inference` never imports `dicom_node`.
- `start_embedded_worker(settings)` runs the same worker as a child process of
  `unimedvl serve` (a real worker on the embedded broker, not Celery's eager mode); it and its
  pool children end when `serve` dies, even by SIGKILL (dicom_node.jobs.lifeline).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_node.config import ConfigError, load_config
from dicom_node.jobs.context import CONFIG_ENV, set_settings
from dicom_node.jobs.lifeline import PARENT_ENV, watch_parent_from_env
from dicom_node.jobs.settings import job_settings

log = logging.getLogger("dicom_node.jobs.worker")


def pin_device(device: str | None) -> str | None:
    """`cuda:N` -> CUDA_VISIBLE_DEVICES=N and "cuda:0"; other values unchanged. Call before CUDA starts."""
    if device is None:
        return None
    m = re.fullmatch(r"cuda:(\d+)", device.strip())
    if m:
        os.environ["CUDA_VISIBLE_DEVICES"] = m.group(1)
        return "cuda:0"
    return device.strip()


def queues_for(kinds_or_queues: Sequence[str] | None) -> list[str]:
    """Queue names from task kinds or queue names (None: both model queues).

    Raises ValueError naming an entry that is neither a queue nor a task kind.
    """
    from dicom_node.jobs.celery_app import BATCH_QUEUE, GENERATION_QUEUE, TASK_QUEUES, UNDERSTANDING_QUEUE

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


def worker_queues(queues: Sequence[str] | None) -> list[str]:
    """The queue names a worker started with `--queue` values (short names, queue names or task
    kinds; None: both model queues) consumes. Raises ValueError for an unknown entry."""
    return queues_for([_QUEUE_ALIASES.get(q, q) for q in queues] if queues else None)


def run_worker(
    settings: Any,
    device: str | None = None,
    queues: Sequence[str] | None = None,
    concurrency: int = 1,
    *,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> None:
    """Run a Celery worker in the foreground until SIGTERM/SIGINT (warm shutdown: finishes the job).

    `queues`: "understanding", "generation", queue names or task kinds (None: both queues); a worker
    on the understanding queue alone loads the understanding weights only. Raises ValueError for
    an unknown queue; Celery's own errors (broker unreachable past its retries) propagate.
    """
    from dicom_node.jobs.celery_app import UNDERSTANDING_QUEUE, app, configure, resolve_broker_url

    device = pin_device(device)
    names = worker_queues(queues)
    parts = "understanding" if names == [UNDERSTANDING_QUEUE] else "all"
    configure(app, resolve_broker_url(settings.broker.url, settings.base_dir))
    app.conf.task_time_limit = job_settings(settings).time_limit_seconds
    set_settings(settings, device, parts)
    if settings.config_path is not None:
        os.environ.setdefault(CONFIG_ENV, str(settings.config_path))
    import dicom_node.jobs.tasks  # noqa: F401  (registers unimedvl.run_job)

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
    """Start `python -m dicom_node.jobs.worker` for `unimedvl serve`; stop it with `stop_worker`.

    The child gets the parent's resolved database, storage and broker locations. Raises OSError
    when the process cannot be started.
    """
    cmd = [sys.executable, "-m", "dicom_node.jobs.worker"]
    if settings.config_path is not None:
        cmd += ["--config", str(settings.config_path)]
    if device:
        cmd += ["--device", device]
    for q in queues or ():
        cmd += ["--queue", q]
    child_env = {**os.environ, **_settings_env(settings), PARENT_ENV: str(os.getpid()), **(env or {})}
    return subprocess.Popen(
        cmd,
        cwd=str(settings.base_dir),
        env=child_env,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,  # its own process group: stop_worker reaches the pool child too
    )


def stop_worker(proc: subprocess.Popen, timeout: float = 30.0, *, signalled: bool = False) -> int | None:
    """SIGTERM to the worker (warm shutdown: the running job finishes), then SIGKILL of its group.
    `signalled`: the SIGTERM was sent already (a second one would interrupt Celery's warm shutdown).

    Killing is safe: an unfinished job recorded nothing and is re-queued when its lease expires.
    """
    if proc.poll() is not None:
        return proc.returncode
    if not signalled:
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
    parser = argparse.ArgumentParser(prog="python -m dicom_node.jobs.worker", description="UniMedVL GPU worker")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (pins GPU N)")
    parser.add_argument("--queue", action="append", default=None, help="understanding, generation or a task kind")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
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
    watch_parent_from_env()  # an embedded worker dies with its `serve` (dicom_node.jobs.lifeline)
    run_worker(settings, args.device, args.queue, args.concurrency, loglevel=args.loglevel)


if __name__ == "__main__":
    main()
