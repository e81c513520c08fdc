"""Fixtures for the node tests: tiny datasets, configs, an in-process node, a subprocess node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicom_node.synthetic import ct_instance
from tests.conftest import REPO, free_port

NODE_AET = "UNIMEDVL"


make_ct = ct_instance  # the node tests' name for it


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    """TOML from {section: {key: value}} (values: str, bool, int, float, list of str)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    lines: list[str] = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {val(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def node_sections(tmp_path: Path, db_url: str, port: int | None = None, **overrides: dict[str, Any]) -> dict[str, Any]:
    sections: dict[str, dict[str, Any]] = {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port or free_port()},
        "storage": {"path": str(tmp_path / "storage"), "min_free_bytes": 0},
        "database": {"url": db_url},
        "http": {"bind": f"127.0.0.1:{free_port()}"},
        "completion": {
            "study_quiet_seconds": 0.5,
            "series_quiet_seconds": 0.3,
            "force_complete_seconds": 30,
            "check_interval_seconds": 0.1,
        },
    }
    for section, keys in overrides.items():
        sections.setdefault(section, {}).update(keys)
    return sections


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Any]:
    from dicom_node.config import load_config

    def make(db_url: str, **overrides: dict[str, Any]) -> Any:
        cfg = write_config(tmp_path / "unimedvl.toml", **node_sections(tmp_path, db_url, **overrides))
        return load_config(cfg)

    return make


@pytest.fixture
def start_node() -> Iterator[Callable[..., Any]]:
    """Start an in-process Node (listener threads + completion monitor); stopped at teardown."""
    from dicom_node.node import Node

    nodes: list[Any] = []

    def start(settings: Any, *, completion: bool = True) -> Any:
        node = Node(settings, completion=completion)
        node.start()
        nodes.append(node)
        return node

    yield start
    for n in nodes:
        n.stop(grace_seconds=2)


def associate(
    port: int,
    *,
    called: str = NODE_AET,
    calling: str = "TESTSCU",
    contexts: list[Any] | None = None,
    tls_args: Any = None,
) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.dimse_timeout = 20
    ae.network_timeout = 20
    if contexts is None:
        contexts = [build_context(CTImageStorage, ExplicitVRLittleEndian)]
    for cx in contexts:
        ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)


def store(port: int, datasets: list[Dataset], **kw: Any) -> list[Dataset]:
    """C-STORE each dataset over one association; returns the status datasets."""
    assoc = associate(port, **kw)
    assert assoc.is_established, "association was not established"
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def storage_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


class NodeProcess:
    """`unimedvl node --config FILE` as a subprocess (own process group); killed at cleanup."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> NodeProcess:
        cmd = [sys.executable, "-m", "dicom_node.cli"]  # this interpreter: no console script needed
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self._fh = open(self.log, "ab")  # noqa: SIM115 - closed in kill()/stop()
        self.proc = subprocess.Popen(
            [*cmd, "node", "--config", str(self.config)],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.config.parent,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            assoc = associate(self.port, contexts=[build_context("1.2.840.10008.1.1")])
            if assoc.is_established:
                assoc.send_c_echo()
                assoc.release()
                return self
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"node did not answer C-ECHO:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self) -> int:
        rc = 0
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                rc = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                rc = self.proc.wait(10)
        self._close()
        return rc

    def _close(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()
            self._fh = None


@pytest.fixture
def node_process() -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def start(config: Path, port: int) -> NodeProcess:
        p = NodeProcess(config, port, config.parent / "node.log").start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


class Gate:
    """Stands in for the group commit's lock (`GroupCommit(lock=...)`): the test holds `lock`, and
    `entered` is set when the leader reaches it inside its first transaction, so further
    submissions queue up behind it and commit together."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entered = threading.Event()

    def __enter__(self) -> None:
        self.entered.set()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
