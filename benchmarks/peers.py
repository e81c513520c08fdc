"""Peer DICOM systems started as real subprocesses: Orthanc, DCMTK storescp, DCMTK storescu.

Used by the ingest benchmark (our node vs the peers, measured in the same run) and by
integration tests that need a real PACS (Orthanc) or a real modality (storescu).

Every peer gets ``TCP_NODELAY=1`` in its environment: Debian's DCMTK build leaves Nagle's
algorithm on unless that variable is set, which adds about 50 ms per instance on loopback
and would make the peers look far slower than they are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
MAX_PDU = 131072  # the largest PDU DCMTK and Orthanc accept; peers are measured at their best setting


class PeerError(RuntimeError):
    """A peer process failed to start, or answered something unexpected."""


def free_port() -> int:
    """A TCP port that was free a moment ago (bind 0 and read back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_env() -> dict[str, str]:
    """Environment for DCMTK-based processes (Orthanc links DCMTK too): Nagle off."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise PeerError(f"{tool} not found on PATH: install DCMTK (apt-get install dcmtk)")
    return path


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _terminate(proc: subprocess.Popen[Any] | None, *, group: bool, timeout: float = 15.0) -> None:
    """SIGTERM (whole process group if `group`), wait, then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, group=group)


def _kill(proc: subprocess.Popen[Any] | None, *, group: bool) -> None:
    if proc is None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait(timeout=15)


def echo(host: str, port: int, called_aet: str, *, calling_aet: str = "BENCH", timeout: int = 5) -> bool:
    """One C-ECHO with DCMTK echoscu; True on success."""
    cmd = [require("echoscu"), "-aet", calling_aet, "-aec", called_aet, "-to", str(timeout)]
    cmd += ["-ta", str(timeout), host, str(port)]
    try:
        r = subprocess.run(cmd, capture_output=True, env=peer_env(), timeout=timeout + 5, check=False)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def wait_for_echo(
    host: str,
    port: int,
    called_aet: str,
    *,
    timeout: float = 30.0,
    proc: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
) -> None:
    """Poll with C-ECHO until the SCP answers; fail early if its process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PeerError(
                f"{called_aet} exited with {proc.returncode} before answering C-ECHO\n{_tail(log) if log else ''}"
            )
        if echo(host, port, called_aet, timeout=2):
            return
        time.sleep(0.1)
    raise PeerError(f"{called_aet} at {host}:{port} did not answer C-ECHO within {timeout:.0f} s")


# --------------------------------------------------------------------------------------------- Orthanc


class OrthancServer:
    """A private Orthanc (storage, index and log under `workdir`) on free loopback ports.

    Use as a context manager, or call start()/stop(). kill() simulates a crashed PACS;
    restart() brings it back on the same ports with the same storage.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        dicomweb: bool = True,
        known_modalities: dict[str, tuple[str, str, int]] | None = None,
        extra_config: dict[str, Any] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.dicomweb = dicomweb
        self.known_modalities = dict(known_modalities or {})
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self.storage_dir = self.workdir / "orthanc-storage"
        # A unique name lets start-up tell our Orthanc from another one already on the port.
        self.name = f"bench-{aet}-{uuid.uuid4().hex[:8]}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- addresses
    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomScpTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "MaximumPduLength": MAX_PDU,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "StableAge": 2,
            "TcpNoDelay": True,
            "KeepAlive": True,
            "HttpTimeout": 60,
            "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in self.known_modalities.items()},
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
        }
        if self.dicomweb:
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False}
        cfg.update(self.extra_config)
        return cfg

    def start(self) -> Self:
        if self.running:
            return self
        if not Path(ORTHANC_BIN).exists():
            raise PeerError(f"{ORTHANC_BIN} not found: install Orthanc (apt-get install orthanc orthanc-dicomweb)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self._proc = subprocess.Popen(
            [ORTHANC_BIN, str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=peer_env(),
            cwd=self.workdir,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PeerError(f"Orthanc exited with {self._proc.returncode} during start-up\n{_tail(self.log_path)}")
            try:
                r = httpx.get(f"{self.url}/system", timeout=2)
                if r.status_code == 200 and r.json().get("Name") == self.name:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise PeerError(f"Orthanc REST did not answer within {self.startup_timeout:.0f} s\n{_tail(self.log_path)}")

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Graceful stop (SIGTERM), waiting for the process to exit."""
        _terminate(self._proc, group=True, timeout=30)
        self._proc = None
        self._close_log()

    def kill(self) -> None:
        """SIGKILL: a PACS that vanished mid-conversation."""
        if self._proc is not None and self._proc.poll() is None:
            _kill(self._proc, group=True)
        self._proc = None
        self._close_log()

    def restart(self) -> Self:
        """Stop (if running) and start again on the same ports with the same storage."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- REST helpers
    def get(self, path: str, **kw: Any) -> Any:
        r = httpx.get(f"{self.url}{path}", timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any, **kw: Any) -> Any:
        r = httpx.post(f"{self.url}{path}", json=body, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def instances(self) -> list[str]:
        """Orthanc identifiers of every stored instance."""
        return list(self.get("/instances"))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def instance_uids(self) -> list[str]:
        """SOP Instance UIDs of every stored instance."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in found]

    def study_instance_ids(self, study_uid: str) -> list[str]:
        """Orthanc identifiers of the instances of one study ([] if the study is unknown)."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        return list(found)

    def study_instances(self, study_uid: str) -> list[str]:
        """SOP Instance UIDs of the instances of one study ([] if the study is unknown)."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        )
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in found]

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """Tags of one instance as Orthanc's "simplified" JSON (keyword -> value)."""
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance."""
        r = httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=60)
        r.raise_for_status()
        return r.content

    def delete_all(self) -> None:
        for pid in self.get("/patients"):
            httpx.delete(f"{self.url}/patients/{pid}", timeout=60).raise_for_status()


# --------------------------------------------------------------------------------------------- storescp


class StoreSCP:
    """DCMTK storescp writing received objects to `workdir/received` as they arrive.

    `--fork` gives each association its own process, so parallel associations are served
    concurrently (the default single-process mode would serialise them). Bit-preserving
    mode (+B) writes the bytes as received, the cheapest storage a C-STORE SCP can do.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        fork: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.port = port or free_port()
        self.fork = fork
        self.extra_args = list(extra_args)  # e.g. ["--ignore"]: a lossy SCP for negative tests
        self.out_dir = self.workdir / "received"
        self.log_path = self.workdir / "storescp.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    host = "127.0.0.1"

    def start(self) -> Self:
        if self._proc is not None and self._proc.poll() is None:
            # Already running (e.g. `with StoreSCP(...).start()`): a second storescp on the same
            # port would fail to bind while the first one answered the C-ECHO, and the first
            # would outlive stop().
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [require("storescp"), "-aet", self.aet, "-od", str(self.out_dir), "+B", "-dhl"]
        cmd += ["-pdu", str(MAX_PDU), "-ta", "30", "-ts", "60"]
        if self.fork:
            cmd.append("--fork")
        cmd += [*self.extra_args, str(self.port)]
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=peer_env(),
            cwd=self.workdir,
            start_new_session=True,
        )
        try:
            wait_for_echo(self.host, self.port, self.aet, proc=self._proc, log=self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # --fork children share the process group: terminate them all.
        _terminate(self._proc, group=True, timeout=10)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def received_files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def clear(self) -> None:
        for p in self.received_files():
            p.unlink()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------- storescu


@dataclass
class SendResult:
    """Outcome of one (possibly parallel) storescu run."""

    seconds: float
    n_files: int
    n_bytes: int
    rc: int
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def instances_per_s(self) -> float:
        return self.n_files / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.n_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def _collect(files_or_dir: Path | str | Iterable[Path | str]) -> list[Path]:
    if isinstance(files_or_dir, str | Path):
        root = Path(files_or_dir)
        if root.is_dir():
            return sorted(p for p in root.rglob("*") if p.is_file())
        return [root]
    return [Path(p) for p in files_or_dir]


def split_evenly(items: Sequence[Path], parts: int) -> list[list[Path]]:
    """`parts` contiguous chunks whose sizes differ by at most one (no empty chunk)."""
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        chunks.append(list(items[start:end]))
        start = end
    return chunks


def storescu_send(
    files_or_dir: Path | str | Iterable[Path | str],
    host: str,
    port: int,
    called_aet: str,
    *,
    calling_aet: str = "BENCH",
    associations: int = 1,
    timeout: float = 600.0,
) -> SendResult:
    """Send files with DCMTK storescu over `associations` parallel processes (one association each).

    The wall clock runs from the start of the first process to the exit of the last one.
    rc is 0 only if every process exited 0 (storescu exits non-zero when a store fails).
    """
    files = _collect(files_or_dir)
    if not files:
        raise PeerError("storescu_send: no files to send")
    n_bytes = sum(p.stat().st_size for p in files)
    exe = require("storescu")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    t0 = time.perf_counter()
    try:
        for chunk in split_evenly(files, associations):
            cmd = [exe, "-aet", calling_aet, "-aec", called_aet, "-pdu", str(MAX_PDU), "-ta", "30", "-to", "30"]
            cmd += [host, str(port), *map(str, chunk)]
            # Output to temporary files, not pipes: a chatty process must never block on a full pipe.
            logs.append(tempfile.TemporaryFile())
            procs.append(
                subprocess.Popen(
                    cmd, stdout=logs[-1], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=peer_env()
                )
            )
        rc = 0
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
            rc = rc or p.returncode
        seconds = time.perf_counter() - t0
        outputs = []
        for f in logs:
            f.seek(0)
            outputs.append(f.read().decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    return SendResult(seconds=seconds, n_files=len(files), n_bytes=n_bytes, rc=rc, output="".join(outputs))
