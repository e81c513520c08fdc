"""C-STORE ingest benchmark: our node vs DCMTK storescp vs Orthanc, measured in the same run.

    unimedvl bench ingest --n 200 --out ingest.json
    python -m benchmarks.ingest --n 1000 --repeats 3 --listeners 2 --out ingest.json

N synthetic CT slices (512x512, 16-bit) are generated once, then sent with DCMTK storescu
over 1 and over 8 parallel associations to each target. Every run gets a fresh target (empty
storage, fresh index), a one-instance warm-up store, then the timed send; afterwards every
instance must be found at the target (files on disk, index rows, Orthanc's REST count).
The best of `repeats` runs is reported (the machine is shared; the best run is the one
least disturbed by other load). Exit status: 0 all verified and all targets met,
2 verified but a target missed, 1 a leg failed or instances went missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.peers import (
    OrthancServer,
    PeerError,
    StoreSCP,
    free_port,
    peer_env,
    storescu_send,
    wait_for_echo,
)
from dicom_node.synthetic import make_ct_series

TARGETS = ("node", "storescp", "orthanc")
# Opt-in (`--targets node,floor,...`): our handler behind a minimal event-driven acceptor
# (benchmarks/acceptor_floor.py), to show what pynetdicom's threaded acceptor costs.
EXTRA_TARGETS = ("floor",)
ASSOCIATIONS = (1, 8)
NODE_AET = "UNIMEDVL"

# Targets (issue 15).
MIN_RATIO_1_VS_ORTHANC = 1.5
MIN_RATIO_8_VS_ORTHANC = 1.5
MIN_RATIO_8_VS_1 = 1.0  # eight associations never slower than one
MAX_SECONDS_1000 = 4.0


@dataclass
class Run:
    target: str
    associations: int
    repeat: int
    seconds: float
    n_files: int
    n_bytes: int
    received: int
    verified: bool
    rc: int
    note: str = ""
    load: float = 0.0  # 1-minute load average when the run started: the machine may be shared
    # Our node only: per-instance milliseconds by stage, from its "association closed" log lines.
    split: dict[str, float] = field(default_factory=dict)

    @property
    def instances_per_s(self) -> float:
        return self.n_files / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.n_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Report:
    n: int
    repeats: int
    listeners: int | None
    runs: list[Run] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    errors: list[str] = field(default_factory=list)

    def best(self, target: str, associations: int) -> Run | None:
        ok = [r for r in self.runs if r.target == target and r.associations == associations and r.verified]
        return min(ok, key=lambda r: r.seconds) if ok else None


# --------------------------------------------------------------------------------------------- our node


def _node_exe() -> list[str]:
    """The `unimedvl` console script next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).with_name("unimedvl")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("unimedvl")
    if found:
        return [found]
    return [sys.executable, "-m", "dicom_node.cli"]


def node_config(
    workdir: Path, port: int, *, listeners: int | None = None, node_keys: dict[str, int] | None = None
) -> str:
    """A private node config: storage and SQLite index under `workdir`, loopback only."""
    lines = [
        "rules = []  # ingest only: no model jobs are planned",
        "[node]",
        f'ae_title = "{NODE_AET}"',
        'host = "127.0.0.1"',
        f"port = {port}",
    ]
    if listeners is not None:
        lines.append(f"listeners = {listeners}")
    lines += [f"{k} = {v}" for k, v in (node_keys or {}).items()]
    lines += [
        "[storage]",
        f'path = "{workdir / "storage"}"',
        "[database]",
        f'url = "sqlite:///{workdir / "index.db"}"',
        "[broker]",
        f'url = "sqla+sqlite:///{workdir / "broker.db"}"',
        "[http]",
        f'bind = "127.0.0.1:{free_port()}"',
        "[model]",
        'path = "tiny"',
        "[completion]",
        # No study completes during the benchmark: only ingest is measured.
        "study_quiet_seconds = 3600",
    ]
    return "\n".join(lines) + "\n"


class NodeProcess:
    """`unimedvl node --config FILE` as a subprocess on a free port, with private storage and DB.

    `wrap` prefixes the command (e.g. a py-spy recorder; "{workdir}" in it becomes the run's
    folder); `env` adds environment variables.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        listeners: int | None = None,
        wrap: list[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 60.0,
        node_keys: dict[str, int] | None = None,
        server: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        # What serves the config: `unimedvl node` unless another server is given (the floor leg).
        self.server = server or [*_node_exe(), "node"]
        self.port = free_port()
        self.aet = NODE_AET
        self.host = "127.0.0.1"
        self.listeners = listeners
        self.wrap = wrap or []
        self.extra_env = env or {}
        self.startup_timeout = startup_timeout
        self.node_keys = node_keys
        self.log_path = workdir / "node.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> NodeProcess:
        if self._proc is not None and self._proc.poll() is None:
            return self  # already running: never a second server on the same port
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "unimedvl.toml"
        cfg.write_text(node_config(self.workdir, self.port, listeners=self.listeners, node_keys=self.node_keys))
        env = peer_env()
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [
                *(w.replace("{workdir}", str(self.workdir)) for w in self.wrap),
                *self.server,
                "--config",
                str(cfg),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=env,
            start_new_session=True,
        )
        try:
            wait_for_echo(
                self.host, self.port, self.aet, timeout=self.startup_timeout, proc=self._proc, log=self.log_path
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # SIGINT first: the node (and a py-spy wrapper) shut down cleanly and flush what they hold.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def storage_files(self) -> int:
        """Stored instance files (temporary/partial files are not counted)."""
        root = self.workdir / "storage"
        if (root / "objects").is_dir():  # the node's layout: objects/ (final) beside tmp/ (in flight)
            root = root / "objects"
        if not root.exists():
            return 0
        return sum(
            1
            for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith((".tmp", ".part"))
        )

    def index_rows(self) -> int | None:
        """Rows of the instance table in the node's SQLite index, None if no such table is found."""
        db = self.workdir / "index.db"
        if not db.exists():
            return None
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for name in ("instance", "instances", "dicom_instance"):
                if name in tables:
                    return int(con.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0])
            return None
        finally:
            con.close()

    def received(self) -> int:
        rows = self.index_rows()
        files = self.storage_files()
        # Both must agree when the index is readable: a row without its file (or the reverse) is a loss.
        return files if rows is None else min(rows, files)


# --------------------------------------------------------------------------------------------- one run


@dataclass
class Target:
    host: str
    port: int
    aet: str
    received: Callable[[], int]
    log_path: Path | None = None


@contextmanager
def _target(
    name: str, workdir: Path, *, listeners: int | None, node_wrap: list[str] | None, node_env: dict[str, str] | None
) -> Iterator[Target]:
    if name == "node":
        node = NodeProcess(workdir, listeners=listeners, wrap=node_wrap, env=node_env)
        node.start()
        try:
            yield Target(node.host, node.port, node.aet, node.received, node.log_path)
        finally:
            node.stop()
    elif name == "floor":
        floor = NodeProcess(workdir, server=[sys.executable, "-m", "benchmarks.acceptor_floor"], env=node_env)
        floor.start()
        try:
            yield Target(floor.host, floor.port, floor.aet, floor.received, floor.log_path)
        finally:
            floor.stop()
    elif name == "storescp":
        with StoreSCP(workdir) as scp:
            yield Target(scp.host, scp.port, scp.aet, lambda: len(scp.received_files()))
    elif name == "orthanc":
        with OrthancServer(workdir, dicomweb=False) as orthanc:
            yield Target(orthanc.host, orthanc.dicom_port, orthanc.aet, orthanc.count_instances)
    else:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS + EXTRA_TARGETS)}")


def _wait_count(received: Callable[[], int], expected: int, timeout: float = 10.0) -> tuple[int, float]:
    """Count at the target; poll briefly in case it lags behind its C-STORE responses."""
    t0 = time.monotonic()
    count = received()
    while count < expected and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        count = received()
    return count, time.monotonic() - t0


def run_once(
    target: str,
    associations: int,
    files: list[Path],
    warmup: Path,
    workdir: Path,
    *,
    repeat: int = 0,
    listeners: int | None = None,
    node_wrap: list[str] | None = None,
    node_env: dict[str, str] | None = None,
    settle_timeout: float = 10.0,
) -> Run:
    """Fresh target, one warm-up instance, the timed send, then verify everything arrived."""
    load = os.getloadavg()[0]
    with _target(target, workdir, listeners=listeners, node_wrap=node_wrap, node_env=node_env) as t:
        warm = storescu_send([warmup], t.host, t.port, t.aet)
        if not warm.ok:
            raise PeerError(f"{target}: warm-up store failed: {warm.output[-2000:]}")
        res = storescu_send(files, t.host, t.port, t.aet, associations=associations)
        expected = len(files) + 1
        count, lag = _wait_count(t.received, expected, settle_timeout)
        log_path = t.log_path
    split = node_split(log_path) if log_path is not None else {}
    received = max(count - 1, 0)  # minus the warm-up instance
    note = ""
    if res.rc != 0:
        note = f"storescu rc={res.rc}: {res.output.strip().splitlines()[-1] if res.output.strip() else ''}"
    elif count != expected:
        note = f"received {received} of {len(files)}"
    elif lag > 0.5:
        note = f"index/storage lagged the C-STORE responses by {lag:.1f} s"
    return Run(
        target=target,
        associations=associations,
        repeat=repeat,
        seconds=res.seconds,
        n_files=res.n_files,
        n_bytes=res.n_bytes,
        received=received,
        verified=res.rc == 0 and count == expected,
        rc=res.rc,
        note=note,
        load=load,
        split=split,
    )


def node_split(log_path: Path) -> dict[str, float]:
    """Per-instance ms by stage over the timed associations (those that stored 2+ instances).

    handler: our C-STORE handler in all; inside it write (reading back, hashing and checking the
    file pynetdicom wrote while the data set arrived), fsync (its fdatasync and rename), and index
    (the wait for the group commit of its row, the batch's directory fsync included). transport:
    association time outside the handler (pynetdicom's PDU reading and writing the received file,
    DIMSE decoding, reactor hand-offs, the sender's own time).
    """
    sums = {"seconds": 0.0, "handler_s": 0.0, "write_s": 0.0, "fsync_s": 0.0, "index_s": 0.0}
    stored = 0
    for line in log_path.read_text(errors="replace").splitlines():
        if 'msg="association closed"' not in line:
            continue
        fields = dict(p.split("=", 1) for p in line.split(" ") if "=" in p)
        n = int(fields.get("stored", "0"))
        if n < 2:
            continue  # the warm-up
        stored += n
        for k in sums:
            sums[k] += float(fields.get(k, "0"))
    if not stored:
        return {}
    ms = {k: 1000 * v / stored for k, v in sums.items()}
    return {
        "transport_ms": round(ms["seconds"] - ms["handler_s"], 3),
        "handler_ms": round(ms["handler_s"], 3),
        "write_ms": round(ms["write_s"], 3),
        "fsync_ms": round(ms["fsync_s"], 3),
        "index_ms": round(ms["index_s"], 3),
    }


# --------------------------------------------------------------------------------------------- report


def _ratio(a: Run | None, b: Run | None) -> float | None:
    if a is None or b is None or a.instances_per_s == 0 or b.instances_per_s == 0:
        return None
    return a.instances_per_s / b.instances_per_s


def checks(report: Report) -> list[dict[str, Any]]:
    """The product-card targets, each with its measured value (None if a leg is missing)."""
    node1, node8 = report.best("node", 1), report.best("node", 8)
    out = [
        {
            "name": "8 associations: node >= 1.0x node on 1 association",
            "value": _ratio(node8, node1),
            "limit": MIN_RATIO_8_VS_1,
        },
        {
            "name": "1 association: node >= 1.5x Orthanc",
            "value": _ratio(node1, report.best("orthanc", 1)),
            "limit": MIN_RATIO_1_VS_ORTHANC,
        },
        {
            "name": "8 associations: node >= 1.5x Orthanc",
            "value": _ratio(node8, report.best("orthanc", 8)),
            "limit": MIN_RATIO_8_VS_ORTHANC,
        },
    ]
    for c in out:
        c["met"] = c["value"] is not None and c["value"] >= c["limit"]
    if report.n >= 1000 and node1 is not None:
        secs = node1.seconds * 1000 / report.n
        out.append({"name": "1,000-slice CT over 1 association < 4 s", "value": secs, "limit": MAX_SECONDS_1000})
        out[-1]["met"] = secs < MAX_SECONDS_1000
    return out


def render(report: Report, console: Console) -> None:
    table = Table(title=f"C-STORE ingest, {report.n} CT slices 512x512 16-bit (best of {report.repeats})")
    for col in ("target", "assoc", "seconds", "inst/s", "MB/s", "vs storescp", "vs Orthanc", "1,000 slices", "ok"):
        table.add_column(col, justify="left" if col in ("target", "ok") else "right")
    for assoc in ASSOCIATIONS:
        for target in TARGETS + EXTRA_TARGETS:
            runs = [r for r in report.runs if r.target == target and r.associations == assoc]
            if not runs:
                continue
            best = report.best(target, assoc)
            if best is None:
                table.add_row(target, str(assoc), "-", "-", "-", "-", "-", "-", f"[red]FAILED {runs[-1].note}")
                continue
            vs_scp = _ratio(best, report.best("storescp", assoc))
            vs_orth = _ratio(best, report.best("orthanc", assoc))
            label = f"{target} (listeners={report.listeners})" if target == "node" and report.listeners else target
            table.add_row(
                label,
                str(assoc),
                f"{best.seconds:.2f}",
                f"{best.instances_per_s:.0f}",
                f"{best.mb_per_s:.1f}",
                f"{vs_scp:.2f}x" if vs_scp is not None else "-",
                f"{vs_orth:.2f}x" if vs_orth is not None else "-",
                f"{best.seconds * 1000 / best.n_files:.1f} s" + ("" if report.n >= 1000 else " (extrap.)"),
                "[green]yes" + (f" ({best.note})" if best.note else ""),
            )
    console.print(table)
    for target in ("node", "floor"):
        for assoc in ASSOCIATIONS:
            best = report.best(target, assoc)
            if best is not None and best.split:
                parts = ", ".join(f"{k[:-3]} {v:.2f}" for k, v in best.split.items())
                console.print(f"  {target}, {assoc} association(s), ms per instance: {parts}")
    for c in checks(report):
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        mark = "[green]met" if c["met"] else "[red]MISSED"
        console.print(f"  {mark}[/] {c['name']}: {value}")
    if report.n < 1000:
        console.print("  (the 1,000-slice target is checked only with --n 1000 or more)")
    lb, la = report.load_before, report.load_after
    console.print(f"  load average before {lb[0]:.2f}, after {la[0]:.2f} on {os.cpu_count()} CPUs")
    for e in report.errors:
        console.print(f"  [red]error[/]: {e}")


def to_json(report: Report) -> dict[str, Any]:
    best = {}
    for assoc in ASSOCIATIONS:
        for target in TARGETS + EXTRA_TARGETS:
            b = report.best(target, assoc)
            if b is not None:
                best[f"{target}/{assoc}"] = {
                    "seconds": b.seconds,
                    "instances_per_s": b.instances_per_s,
                    "mb_per_s": b.mb_per_s,
                    "seconds_per_1000": b.seconds * 1000 / b.n_files,
                }
    return {
        "benchmark": "ingest",
        "n": report.n,
        "repeats": report.repeats,
        "listeners": report.listeners,
        "cpus": os.cpu_count(),
        "load_before": report.load_before,
        "load_after": report.load_after,
        "best": best,
        "checks": checks(report),
        "runs": [asdict(r) | {"instances_per_s": r.instances_per_s, "mb_per_s": r.mb_per_s} for r in report.runs],
        "errors": report.errors,
    }


# --------------------------------------------------------------------------------------------- main


def benchmark(
    n: int,
    *,
    repeats: int = 2,
    targets: tuple[str, ...] = TARGETS,
    associations: tuple[int, ...] = ASSOCIATIONS,
    listeners: int | None = None,
    node_wrap: list[str] | None = None,
    node_env: dict[str, str] | None = None,
    workdir: Path | None = None,
    console: Console | None = None,
) -> Report:
    console = console or Console()
    report = Report(n=n, repeats=repeats, listeners=listeners, load_before=os.getloadavg())
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="unimedvl-bench-")) if workdir is None else workdir
    try:
        t0 = time.perf_counter()
        files = make_ct_series(root / "ct", n, seed=0)
        warmup = make_ct_series(root / "warmup", 1, seed=1, patient_id="BENCH^WARMUP")[0]
        console.print(f"generated {n} CT slices in {time.perf_counter() - t0:.1f} s")
        # Interleave targets within each repeat so background load hits them alike.
        for rep in range(repeats):
            for assoc in associations:
                for target in targets:
                    wd = root / f"{target}-{assoc}-{rep}"
                    try:
                        run = run_once(
                            target,
                            assoc,
                            files,
                            warmup,
                            wd,
                            repeat=rep,
                            listeners=listeners,
                            node_wrap=node_wrap,
                            node_env=node_env,
                        )
                    except (PeerError, OSError, subprocess.SubprocessError) as exc:
                        report.errors.append(f"{target} x{assoc} run {rep}: {exc}"[:3000])
                        console.print(f"[red]{target} x{assoc} failed[/]: {str(exc)[:500]}")
                        continue
                    report.runs.append(run)
                    console.print(
                        f"{target:>8} x{assoc} run {rep}: {run.seconds:6.2f} s, {run.instances_per_s:6.0f} inst/s"
                        f"  (load {run.load:.1f})" + ("" if run.verified else f"  [red]{run.note}")
                    )
                    if run.verified and not (node_wrap and target == "node"):
                        shutil.rmtree(wd, ignore_errors=True)
    finally:
        report.load_after = os.getloadavg()
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
    return report


def exit_code(report: Report, targets: tuple[str, ...] = TARGETS) -> int:
    if report.errors or any(not r.verified for r in report.runs) or not report.runs:
        return 1
    if not set(TARGETS) <= set(targets):  # the targets compare the node with both peers
        return 0
    return 0 if all(c["met"] for c in checks(report)) else 2


def main(
    n: int = 200,
    out: str | None = None,
    *,
    repeats: int = 2,
    targets: tuple[str, ...] = TARGETS,
    listeners: int | None = None,
    node_wrap: list[str] | None = None,
    node_env: dict[str, str] | None = None,
    workdir: str | None = None,
) -> int:
    """Run the benchmark, print the table, write JSON to `out`; see the module doc for the exit status."""
    if n < 1:
        raise ValueError("n must be >= 1")
    # Piped output (CI logs, tee) would otherwise be squeezed to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 140)
    report = benchmark(
        n,
        repeats=repeats,
        targets=targets,
        listeners=listeners,
        node_wrap=node_wrap,
        node_env=node_env,
        workdir=Path(workdir) if workdir else None,
        console=console,
    )
    render(report, console)
    if out:
        Path(out).write_text(json.dumps(to_json(report), indent=2))
        console.print(f"wrote {out}")
    return exit_code(report, targets)


def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="synthetic CT slices per run (default 200)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--repeats", type=int, default=2, help="runs per target and association count; best is kept")
    ap.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma list of node,storescp,orthanc (and floor: see benchmarks/acceptor_floor.py)",
    )
    ap.add_argument("--listeners", type=int, default=None, help="write [node] listeners = N into the node config")
    ap.add_argument(
        "--py-spy",
        action="store_true",
        help="profile the node with py-spy: WORKDIR/node-<assoc>-<run>/profile.txt (collapsed stacks)",
    )
    ap.add_argument("--workdir", default=None, help="keep generated files and target data here")
    args = ap.parse_args(argv)
    wrap = None
    if args.py_spy:
        if not args.workdir:
            ap.error("--py-spy needs --workdir (the profiles are kept there)")
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        wrap = [exe, "record", "--rate", "200", "--subprocesses", "--threads", "--format", "raw"]
        wrap += ["-o", "{workdir}/profile.txt", "--"]
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return main(
        n=args.n,
        out=args.out,
        repeats=args.repeats,
        targets=targets,
        listeners=args.listeners,
        node_wrap=wrap,
        workdir=args.workdir,
    )


if __name__ == "__main__":
    raise SystemExit(_cli())
