"""Fixtures for the job tests: configs, tiny studies ingested into the index, real worker
processes, a private RabbitMQ vhost per test."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from tests.conftest import REPO, free_port, require_marker, require_tool

# Small, fast tasks for the tiny model (a few tokens each).
FAST_RULES: list[dict[str, Any]] = [
    {
        "name": "cr-report",
        "match": {"Modality": ["CR", "DX"]},
        "tasks": [{"kind": "report", "prompt": "Describe the image.", "slices": "all", "max_new_tokens": 4}],
    },
    {
        "name": "ct-report",
        "match": {"Modality": "CT"},
        "tasks": [{"kind": "report", "prompt": "Describe the slice.", "slices": "middle", "max_new_tokens": 4}],
    },
]


def slow_rules(steps: int) -> list[dict[str, Any]]:
    """A CR study -> one synthesized image taking `steps` denoising steps at 256x256 (~20 ms a step
    on a 2-core CPU): a run of fixed length, long enough to kill or disturb a worker mid-task.

    Not a report: text decoding stops wherever the tiny model happens to emit a stop token, so its
    length depends on the input and the machine, and a "long" report once ended before its first
    lease renewal on a faster CI machine."""
    return [
        {
            "name": "cr-slow-synthesis",
            "match": {"Modality": ["CR"]},
            "tasks": [{"kind": "synthesize", "prompt": "A chest radiograph.", "size": [256, 256], "steps": steps}],
        }
    ]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def write_config(
    tmp_path: Path, db_url: str, broker_url: str, *, model_path: str = "tiny", pacs: tuple[str, int] | None = None
) -> Path:
    """A config for these tests; `pacs` = (AE title, port) of a PACS on 127.0.0.1 (default: nothing listens)."""
    sections: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "UNIMEDVL", "host": "127.0.0.1", "port": free_port()},
        "storage": {"path": str(tmp_path / "storage"), "min_free_bytes": 0},
        "database": {"url": db_url},
        "broker": {"url": broker_url},
        "http": {"bind": f"127.0.0.1:{free_port()}"},
        "model": {"path": model_path, "device": "cpu"},
        "completion": {
            "study_quiet_seconds": 0.5,
            "series_quiet_seconds": 0.3,
            "force_complete_seconds": 60,
            "check_interval_seconds": 0.2,
        },
    }
    lines: list[str] = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    aet, port = pacs or ("PACS", free_port())
    lines += ["[[destinations]]", 'name = "pacs"', 'kind = "dimse"', f'ae_title = "{aet}"', 'host = "127.0.0.1"']
    lines.append(f"port = {port}")
    path = tmp_path / ("unimedvl.toml" if model_path == "tiny" else "unimedvl-other-model.toml")
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- brokers


def _rabbitmqctl(*args: str, attempts: int = 3) -> None:
    """rabbitmqctl with a few retries: another test may be restarting the broker's app right now."""
    for i in range(attempts):
        r = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return
        if i + 1 == attempts:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {r.stdout[-500:]} {r.stderr[-1000:]}")
        subprocess.run(["rabbitmqctl", "await_startup", "--timeout", "30"], capture_output=True, timeout=60)
        time.sleep(1)


@contextmanager
def rabbitmq_app_stopped() -> Iterator[None]:
    """The machine's RabbitMQ application stopped for the block, and started again whatever
    happens inside it (or in the stop itself), so a failing test never leaves it down."""
    try:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
        yield
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=120)
        _rabbitmqctl("await_startup", "--timeout", "60")


@pytest.fixture
def rabbit_vhost(amqp_url: str) -> Iterator[str]:
    """A private vhost (queues have fixed names, so parallel runs must not share one); deleted after."""
    require_marker("rabbitmq", "RabbitMQ")
    name = f"unimedvl-test-{uuid.uuid4().hex[:10]}"
    try:
        _rabbitmqctl("add_vhost", name)
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        u = urlsplit(amqp_url)
        yield f"{u.scheme}://{u.netloc}/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


@pytest.fixture(params=["embedded", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "embedded":
        return f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    return request.getfixturevalue("rabbit_vhost")


# The two deployments every worker fault is tested on: the embedded defaults, and production's.
BROKER_DB_SETUPS = [
    pytest.param(("embedded", "sqlite"), id="embedded-sqlite"),
    pytest.param(("rabbitmq", "postgres"), id="rabbitmq-postgres", marks=[pytest.mark.rabbitmq, pytest.mark.postgres]),
]


def setup_settings(setup: tuple[str, str], request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Settings (DB initialised) for one of BROKER_DB_SETUPS: embedded SQLite broker + SQLite index,
    or a private RabbitMQ vhost + a fresh PostgreSQL database."""
    from dicom_node.config import load_config
    from dicom_node.db import init_db

    broker_kind, db_kind = setup
    broker_url = (
        f"sqla+sqlite:///{tmp_path / 'broker.db'}"
        if broker_kind == "embedded"
        else request.getfixturevalue("rabbit_vhost")
    )
    db_url = f"sqlite:///{tmp_path / 'index.db'}" if db_kind == "sqlite" else request.getfixturevalue("pg_url")
    settings = load_config(write_config(tmp_path, db_url, broker_url))
    init_db(settings.database.url)
    return settings


# --------------------------------------------------------------------------- studies


def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + DICM + file meta, data set) as the node's C-STORE handler receives them."""
    assert data[128:132] == b"DICM"
    # (0002,0000) UL, explicit VR: tag 4 + VR 2 + length 2 + value 4.
    group_len = struct.unpack("<I", data[140:144])[0]
    end = 144 + group_len
    return data[:end], data[end:]


def ingest(settings: Any, paths: list[Path], *, calling_ae: str = "MODALITY") -> None:
    """Index files through the node's ingest path (storage + index rows), as a C-STORE would."""
    from dicom_node.ingest import Peer
    from dicom_node.node import make_ingest

    ing = make_ingest(settings)
    try:
        for p in paths:
            data = p.read_bytes()
            head, body = split_part10(data)
            ts = str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            ing.receive(head, body, Peer(calling_ae, "UNIMEDVL", "127.0.0.1"), transfer_syntax_uid=ts)
    finally:
        ing.close()
        ing.engine.dispose()


def complete_all(engine: Any, settings: Any) -> list[Any]:
    """Complete every received revision now (the monitor's timers, moved forward)."""
    from dicom_node.completion import CompletionMonitor

    return CompletionMonitor(engine, settings).poll(datetime.now(UTC) + timedelta(hours=2))


def cr_study(folder: Path, seed: int = 0) -> list[Path]:
    from dicom_node.synthetic import make_cr

    return [make_cr(folder, rows=64, cols=64, seed=seed, study_uid=generate_uid())]


def ct_study(folder: Path, slices: int = 3) -> list[Path]:
    from dicom_node.synthetic import make_ct_series

    return make_ct_series(folder, slices, rows=32, cols=32, study_uid=generate_uid())


def with_extra_series(paths: list[Path], folder: Path, modality: str) -> list[Path]:
    """A copy of the first file as a new series of `modality` in the same study (routing matches none)."""
    ds = dcmread(paths[0])
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.SeriesDescription = "scanned request form"
    out = folder / f"{modality}-{ds.SOPInstanceUID[-8:]}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return [*paths, out]


def undecodable_cr(folder: Path) -> list[Path]:
    """A CR whose JPEG Baseline pixel data is garbage: the node stores it, the pipeline cannot decode it."""
    src = cr_study(folder / "src", seed=7)[0]
    ds = dcmread(src)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 this is not a JPEG stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    out = folder / "undecodable.dcm"
    ds.save_as(out, enforce_file_format=True)
    return [out]


# --------------------------------------------------------------------------- workers


class WorkerProcess:
    """A real worker (`python -m dicom_node.jobs.worker`) in its own process group; killed at cleanup."""

    def __init__(self, settings: Any, log: Path, *, celery_cli: bool = False) -> None:
        from dicom_node.jobs.worker import start_embedded_worker

        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in kill()/stop()
        # PYTHONPATH: the worker runs in the config's folder (tmp_path), import the checkout's code.
        env = {"PYTHONPATH": str(REPO)}
        if not celery_cli:
            self.proc = start_embedded_worker(settings, stdout=self._fh, stderr=subprocess.STDOUT, env=env)
            return
        # The plain Celery command line, configured by environment only.
        env.update(
            UNIMEDVL_CONFIG=str(settings.config_path),
            UNIMEDVL_BROKER__URL=settings.broker.url,
            UNIMEDVL_DATABASE__URL=settings.database.url,
        )
        cmd = [
            str(Path(sys.executable).with_name("celery")),
            "-A",
            "dicom_node.jobs.celery_app",
            "worker",
            "-Q",
            "unimedvl.understanding,unimedvl.generation",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
            f"--hostname=celery-cli-{uuid.uuid4().hex[:6]}@%h",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=str(settings.base_dir),
            env={**os.environ, **env},
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the whole group (pool parent and child): a crash, no cleanup of any kind."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._fh.close()

    def stop(self) -> None:
        from dicom_node.jobs.worker import stop_worker

        stop_worker(self.proc, timeout=15)
        self._fh.close()

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(settings: Any, *, celery_cli: bool = False) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", celery_cli=celery_cli)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, diagnostics: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnostics()}")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Any]:
    """Orthanc as the PACS results are delivered to (DIMSE); killed at teardown."""
    from benchmarks.peers import OrthancServer

    require_tool("Orthanc")
    server = OrthancServer(tmp_path / "orthanc", dicomweb=False).start()
    try:
        yield server
    finally:
        server.kill()
