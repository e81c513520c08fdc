"""End-to-end gateway benchmark: modality -> `unimedvl serve` -> tiny model on CPU -> Orthanc.

Two figures, measured in one run against a real Orthanc as the destination:

1. Turnaround overhead (target < 2 s): for a CT series and a chest CR study, the time from the
   last instance received (index `last_received_at`) to the last output stored in Orthanc
   (outbox `done_at`, cross-checked over Orthanc's REST API), MINUS the configured quiet period
   and MINUS the model's own compute (the pipeline time each worker logs). The rest is split
   along the critical path: completion detection lag beyond the quiet period, planning,
   pickup (job created -> claimed, or previous job finished -> claimed on a busy worker; split
   into broker polling up to the worker's "received" log line and pool hand-over + claim), job
   I/O (load sources, write and record outputs), delivery tail (last job done -> last output
   acknowledged by Orthanc).
2. Throughput: N single-image CR studies sent back to back, studies per minute from the first
   send to the last delivery, with 1 worker (`unimedvl serve`, embedded worker) and with 2
   workers (`unimedvl node --api` + two `unimedvl worker` processes, or with `--split serve`
   `unimedvl serve` + one extra `unimedvl worker`; all on the embedded SQLite broker and index).
   With N > 1 CPU workers each gets OMP_NUM_THREADS = cores / N.

`--split remote` runs workers without the node's disk (`[worker] node_url`, their own empty
storage folders; sources over WADO-RS, outputs uploaded, dicom_node.jobs.remote), turnaround
included with 1 worker (`node --api` + 1 remote worker); `--split node remote` measures both in
the same run, and the remote rows add the bytes moved over HTTP per study (from the workers' logs).

Each turnaround case runs `--repeats` times; the table shows the run with the median overhead
(its breakdown adds up to its total), the spread and the means; the JSON keeps every run.

Each profile runs on its own gateway: "default" keeps the shipped polling intervals
([completion] check_interval_seconds 1, [export] poll_seconds 1), "tuned" sets both to 0.1 s,
so the figures show what the defaults cost. The embedded broker (kombu's SQLAlchemy
transport) polls once a second and has no setting.

    python -m benchmarks.e2e [--ct-slices 100] [--ct-size 128] [--cr-size 256] [--studies 6]
                             [--workers 1 2] [--split node|serve|remote ...] [--profiles default tuned]
                             [--quiet 2] [--repeats 3] [--no-counted] [--keep DIR] [--out figures.json]

Exit status: 0 all median overheads < 2 s and nothing lost, 2 an overhead above target, 1 a
job failed or an output is missing from Orthanc.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.peers import OrthancServer, PeerError, free_port, peer_env, storescu_send, wait_for_echo
from dicom_node.synthetic import make_cr, make_ct_series, new_uid

TARGET_OVERHEAD_S = 2.0
NODE_AET = "UNIMEDVL"
TERMINAL_JOB = {"done", "failed"}
TERMINAL_DELIVERY = {"done", "failed", "superseded"}

PROFILES: dict[str, dict[str, float]] = {
    "default": {"check_interval_seconds": 1.0, "poll_seconds": 1.0},
    "tuned": {"check_interval_seconds": 0.1, "poll_seconds": 0.1},
}


def bench_rules(ct_steps: int = 2) -> str:
    """The benchmark's own routing rules (TOML): CT report + segmentation on 3 key slices, CR report + VQA."""
    return f"""
[[rules]]
name = "bench-ct"
match = {{ Modality = ["CT"] }}
stop = true
tasks = [
  {{ kind = "report", slices = "key:3", max_new_tokens = 32 }},
  {{ kind = "segment", slices = "key:3", steps = {ct_steps}, targets = [{{ label = "lesion" }}] }},
]

[[rules]]
name = "bench-cr"
match = {{ Modality = ["CR", "DX"] }}
stop = true
tasks = [
  {{ kind = "report", max_new_tokens = 32 }},
  {{ kind = "vqa", max_new_tokens = 8, questions = ["Is there a nodule?"] }},
]
"""


def gateway_config(
    workdir: Path, *, port: int, http_port: int, orthanc: OrthancServer, quiet: float, profile: dict[str, float]
) -> str:
    """A private gateway: SQLite index and embedded broker under `workdir`, Orthanc as the only destination."""
    return (
        bench_rules()
        + f"""
[node]
ae_title = "{NODE_AET}"
host = "127.0.0.1"
port = {port}

[storage]
path = "{workdir / "storage"}"
min_free_bytes = 0

[database]
url = "sqlite:///{workdir / "index.db"}"

[broker]
url = "sqla+sqlite:///{workdir / "broker.db"}"

[http]
bind = "127.0.0.1:{http_port}"

[model]
path = "tiny"
device = "cpu"

[completion]
study_quiet_seconds = {quiet}
series_quiet_seconds = {quiet}
check_interval_seconds = {profile["check_interval_seconds"]}

[export]
poll_seconds = {profile["poll_seconds"]}

[[destinations]]
name = "pacs"
kind = "dimse"
ae_title = "{orthanc.aet}"
host = "{orthanc.host}"
port = {orthanc.dicom_port}
"""
    )


def _exe() -> list[str]:
    beside = Path(sys.executable).with_name("unimedvl")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "dicom_node.cli"]


class Proc:
    """A subprocess in its own process group, output to a log file; stop() = SIGINT, then SIGKILL."""

    def __init__(self, cmd: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        env = {**peer_env(), **(env or {})}
        env["PYTHONUNBUFFERED"] = "1"
        env["TZ"] = "UTC"  # worker log times are local time; received_times() reads them as UTC
        self.proc = subprocess.Popen(
            cmd, stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env,
            start_new_session=True,
        )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 40.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        # Celery pool children live in the same group; make sure nothing is left behind.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._fh.close()


MODEL_LOADED = re.compile(r"model loaded in [\d.]+ s")
SPLITS = ("node", "serve", "remote")
MOVED = re.compile(r"(?:fetched \d+ instance\(s\), |uploaded \d+ output\(s\), )(\d+) bytes")


def moved_bytes(logs: list[str]) -> int:
    """Bytes remote workers fetched (WADO-RS) and uploaded (outputs), from their log lines."""
    return sum(int(m.group(1)) for text in logs for m in MOVED.finditer(text))


def _wait_ready(proc: Proc, timeout: float) -> None:
    """Until the Celery worker logs "ready." (its queues are declared)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready." in proc.text():
            return
        if not proc.alive():
            raise PeerError(f"{proc.log.name} exited early:\n{proc.text()[-3000:]}")
        time.sleep(0.2)
    raise PeerError(f"{proc.log.name} was not ready within {timeout:.0f} s")


def _wait_models(procs: list[Proc], n: int, timeout: float) -> None:
    """Until `n` "model loaded" lines appear across the logs (each worker's pool child warms up at start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sum(len(MODEL_LOADED.findall(p.text())) for p in procs)
        if found >= n:
            return
        for p in procs:
            if not p.alive():
                raise PeerError(f"{p.log.name} exited early:\n{p.text()[-3000:]}")
        time.sleep(0.2)
    raise PeerError(f"workers did not load the model within {timeout:.0f} s")


class Gateway:
    """`unimedvl serve` for one worker; for N workers `unimedvl node --api` + N `unimedvl worker`
    processes (split "node") or `unimedvl serve` + N-1 extra `unimedvl worker` processes (split "serve"),
    all on the same embedded SQLite broker and index."""

    def __init__(
        self, workdir: Path, orthanc: OrthancServer, *, workers: int, quiet: float, profile: str, split: str = "node"
    ) -> None:
        if split not in SPLITS:
            raise ValueError("split is 'node', 'serve' or 'remote'")
        self.workdir = workdir
        self.port = free_port()
        self.http_port = free_port()
        self.workers = workers
        self.split = "serve" if workers == 1 and split != "remote" else split
        self.quiet = quiet
        self.profile = profile
        self.config = workdir / "unimedvl.toml"
        self.db_url = f"sqlite:///{workdir / 'index.db'}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            gateway_config(
                workdir, port=self.port, http_port=self.http_port, orthanc=orthanc, quiet=quiet,
                profile=PROFILES[profile],
            )
        )  # fmt: skip
        self.procs: list[Proc] = []

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 180.0) -> Gateway:
        cfg = ["--config", str(self.config)]
        # CPU workers share the cores: one torch thread pool per worker, sized to its share (as one
        # would deploy CPU workers; oversubscribed pools slow every job down). One worker: torch's default.
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.workers))} if self.workers > 1 else {}
        try:
            if self.split == "serve":
                self.procs.append(Proc([*_exe(), "serve", *cfg], self.workdir / "serve.log", self.workdir, env))
            else:
                self.procs.append(Proc([*_exe(), "node", "--api", *cfg], self.workdir / "node.log", self.workdir))
            node = self.procs[0]
            wait_for_echo("127.0.0.1", self.port, NODE_AET, timeout=timeout, proc=node.proc, log=node.log)
            # After the node ran the migrations: workers open the same SQLite index.
            extra = self.workers - 1 if self.split == "serve" else self.workers
            token = self._worker_token() if self.split == "remote" else ""
            for i in range(extra):
                log = self.workdir / f"worker{i + 1}.log"
                wcfg = ["--config", str(self._remote_config(i + 1, token))] if token else cfg
                self.procs.append(Proc([*_exe(), "worker", *wcfg], log, self.workdir, env))
                if i + 1 < extra:
                    # One at a time: workers starting together on the embedded broker race to
                    # create its queue rows (UNIQUE constraint failed: kombu_queue.name).
                    _wait_ready(self.procs[-1], timeout)
            _wait_models(self.procs, self.workers, timeout)
            self._wait_api(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_token(self) -> str:
        """A worker-role user and its API token in the gateway's index (migrated by the node)."""
        from dicom_node.console.auth import add_user, create_token
        from dicom_node.db import make_engine

        engine = make_engine(self.db_url)
        try:
            add_user(engine, "bench-worker", "bench-worker-password", "worker")
            return create_token(engine, "bench-worker", "benchmark")
        finally:
            engine.dispose()

    def _remote_config(self, i: int, token: str) -> Path:
        """A remote worker's config: the gateway's index and broker, its own empty storage, the node's URL."""
        folder = self.workdir / f"remote-worker{i}"
        folder.mkdir(exist_ok=True)
        text = self.config.read_text().replace(f'path = "{self.workdir / "storage"}"', f'path = "{folder / "storage"}"')
        path = folder / "unimedvl.toml"
        path.write_text(text + f'\n[worker]\nnode_url = "{self.api}"\nnode_token = "{token}"\n')
        return path

    def _wait_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api}/healthz", timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise PeerError("status API did not answer")

    def stop(self) -> None:
        # Workers first (warm shutdown), then the node.
        for p in reversed(self.procs):
            p.stop()
        self.procs = []

    def worker_logs(self) -> list[str]:
        return [p.text() for p in self.procs]

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ timelines


def _ts(v: str | None) -> datetime | None:
    if not v:
        return None
    t = datetime.fromisoformat(v)
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def finished(tl: dict[str, Any]) -> bool:
    revs = tl.get("revisions") or []
    if not revs or revs[-1].get("state") != "complete" or not revs[-1].get("planned_at"):
        return False
    jobs = [j for r in revs for j in r.get("jobs", [])]
    return all(
        j["state"] in TERMINAL_JOB and all(d["state"] in TERMINAL_DELIVERY for d in j["deliveries"]) for j in jobs
    )


def wait_timelines(db_url: str, study_uids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll the studies' timelines in the gateway's index (the API needs a login since the console)."""
    from dicom_node.db import make_engine
    from dicom_node.jobs.admin import study_timeline

    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    engine = make_engine(db_url)
    try:
        while time.monotonic() < deadline:
            for uid in study_uids:
                if uid in done:
                    continue
                tl = study_timeline(engine, uid)
                if tl is not None and finished(tl):
                    done[uid] = json.loads(json.dumps(tl, default=str))
            if len(done) == len(study_uids):
                return done
            time.sleep(0.25)
    finally:
        engine.dispose()
    raise PeerError(f"{len(study_uids) - len(done)} of {len(study_uids)} studies not finished within {timeout:.0f} s")


# Worker log lines (dicom_node.jobs.worker's basicConfig format, local time = UTC in our children).
CLAIMED = re.compile(r"job (\d+) \((\w+)\) claimed")
PIPELINE = re.compile(r"task (\w+): .* in ([\d.]+) s")
RECEIVED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Task unimedvl\.run_job\[[^\]]+\] received")


def pipeline_seconds(logs: list[str]) -> dict[int, float]:
    """Model compute per job id: the pipeline's own timing line after that job's "claimed" line.

    A worker runs one job at a time (concurrency 1), so within one log the pipeline line belongs
    to the last job claimed in that log. (0.1 s resolution: the pipeline logs "%.1f s".)
    """
    out: dict[int, float] = {}
    for text in logs:
        current: int | None = None
        for line in text.splitlines():
            if m := CLAIMED.search(line):
                current = int(m.group(1))
            elif (m := PIPELINE.search(line)) and current is not None:
                out[current] = float(m.group(2))
                current = None
    return out


DONE_PHASES = re.compile(r"job (\d+) done: .*\(sources ([\d.]+) s, run ([\d.]+) s, record ([\d.]+) s\)")


def job_phases(logs: list[str]) -> dict[int, dict[str, float]]:
    """Each job's own split from the worker's "done" line: sources (load/parse or fetch), run
    (the pipeline, slice sorting included), record (encode, store, output transaction); seconds."""
    return {
        int(m.group(1)): {
            "sources_s": float(m.group(2)),
            "run_phase_s": float(m.group(3)),
            "record_s": float(m.group(4)),
        }
        for text in logs
        for m in DONE_PHASES.finditer(text)
    }


def received_times(logs: list[str]) -> dict[int, datetime]:
    """When the worker's Celery consumer got each job's message (the "received" line before its claim)."""
    out: dict[int, datetime] = {}
    for text in logs:
        last: datetime | None = None
        for line in text.splitlines():
            if m := RECEIVED.search(line):
                last = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
            elif (m := CLAIMED.search(line)) and last is not None:
                out[int(m.group(1))] = last
                last = None
    return out


@dataclass
class Turnaround:
    study: str
    instances: int
    jobs: list[str]
    outputs: int
    in_orthanc: int
    total_s: float  # last received -> last output stored in Orthanc
    quiet_s: float
    compute_s: float  # model pipelines (sum; one worker runs the jobs one after another)
    overhead_s: float  # total - quiet - compute
    completion_lag_s: float  # completed_at - last_received - quiet
    planning_s: float  # completed -> jobs created
    pickup_s: float  # job ready -> claimed by the worker, summed over the jobs
    broker_wait_s: float | None  # of which: ready -> message received by the worker (the broker's polling)
    dispatch_s: float | None  # of which: received -> claimed (Celery pool hand-over + the claim's DB write)
    job_io_s: float  # claimed -> finished minus compute, summed (load sources, write + record outputs)
    delivery_tail_s: float  # last job finished -> last output acknowledged by Orthanc
    per_job: list[dict[str, Any]] = field(default_factory=list)
    met: bool = False
    completed_because: str = ""  # quiet | count | mpps | force: quiet_s is 0 unless it waited for the quiet period
    bytes_moved: int | None = None  # remote workers: WADO-RS in + outputs uploaded, this study


def _delivered_after(job: dict[str, Any], finished_at: datetime) -> float | None:
    """Seconds from the job's commit to its last output acknowledged by the destination."""
    done = [_ts(d["done_at"]) for d in job["deliveries"] if d["done_at"]]
    return round((max(done) - finished_at).total_seconds(), 3) if done else None  # type: ignore[type-var]


def turnaround(
    tl: dict[str, Any],
    quiet: float,
    compute: dict[int, float],
    in_orthanc: int,
    label: str,
    received: dict[int, datetime] | None = None,
) -> Turnaround:
    rev = tl["revisions"][-1]
    # A study completed by its count or MPPS waited for no quiet period: nothing to subtract.
    quiet = quiet if rev.get("completed_because") in (None, "quiet", "force") else 0.0
    last_rx = _ts(rev["received_last"])
    completed = _ts(rev["completed_at"])
    jobs = sorted(rev["jobs"], key=lambda j: j["started_at"] or "")
    assert last_rx and completed
    created = min(_ts(j["created_at"]) for j in jobs)  # type: ignore[type-var]
    done_ats = [_ts(d["done_at"]) for j in jobs for d in j["deliveries"] if d["done_at"]]
    end = max(done_ats) if done_ats else max(_ts(j["finished_at"]) for j in jobs)  # type: ignore[type-var]
    pickup = io = comp = broker = 0.0
    received = received or {}
    ready = created
    per_job = []
    for j in jobs:
        started, fin = _ts(j["started_at"]), _ts(j["finished_at"])
        c = compute.get(j["id"], 0.0)
        # No clamping: the parts must add up to the total. The compute figure comes from a log
        # line rounded to 0.1 s, so job I/O can come out a few hundredths below zero.
        wait = (started - ready).total_seconds()
        span = (fin - started).total_seconds()
        pickup += wait
        got = received.get(j["id"])
        if got is not None:
            broker += max(0.0, (got - ready).total_seconds())
        io += span - c
        comp += c
        per_job.append(
            {
                "id": j["id"], "kind": j["kind"], "state": j["state"], "pickup_s": round(wait, 3),
                "run_s": round(span, 3), "compute_s": c,
                "delivered_s": _delivered_after(j, fin),
            }
        )  # fmt: skip
        ready = max(ready, fin)
    total = (end - last_rx).total_seconds()
    t = Turnaround(
        study=label,
        instances=rev["instances"],
        jobs=[f"{j['kind']}:{j['state']}" for j in jobs],
        outputs=sum(j["outputs"] for j in jobs),
        in_orthanc=in_orthanc,
        total_s=round(total, 3),
        quiet_s=quiet,
        compute_s=round(comp, 3),
        overhead_s=round(total - quiet - comp, 3),
        completion_lag_s=round((completed - last_rx).total_seconds() - quiet, 3),
        planning_s=round((created - completed).total_seconds(), 3),
        pickup_s=round(pickup, 3),
        broker_wait_s=round(broker, 3) if all(j["id"] in received for j in jobs) else None,
        dispatch_s=round(pickup - broker, 3) if all(j["id"] in received for j in jobs) else None,
        job_io_s=round(io, 3),
        delivery_tail_s=round((end - ready).total_seconds(), 3),
        per_job=per_job,
        completed_because=rev.get("completed_because") or "quiet",
    )
    t.met = t.overhead_s < TARGET_OVERHEAD_S and all(j["state"] == "done" for j in jobs) and in_orthanc == t.outputs
    return t


def outputs_in_orthanc(db_url: str, orthanc: OrthancServer, study_uid: str) -> tuple[int, int]:
    """(outputs recorded by the gateway, how many of their SOP Instance UIDs Orthanc holds)."""
    from dicom_node.db import make_engine
    from dicom_node.jobs.admin import list_jobs

    engine = make_engine(db_url)
    try:
        jobs = list_jobs(engine, study_instance_uid=study_uid, limit=1000)
    finally:
        engine.dispose()
    uids = {o["sop_instance_uid"] for j in jobs for o in j["outputs"]}
    held = set(orthanc.study_instances(study_uid))
    return len(uids), len(uids & held)


# ------------------------------------------------------------------------------------------ runs


def _send(files: list[Path], gw: Gateway) -> None:
    r = storescu_send(files, "127.0.0.1", gw.port, NODE_AET, calling_aet="BENCHMOD")
    if not r.ok:
        raise PeerError(f"storescu failed (rc {r.rc}):\n{r.output[-2000:]}")


def with_count(files: list[Path]) -> list[Path]:
    """Write ImagesInAcquisition (0020,1002) = len(files) into every file, as many modalities do."""
    from pydicom import dcmread

    for f in files:
        ds = dcmread(f)
        ds.ImagesInAcquisition = len(files)
        ds.save_as(f, enforce_file_format=True)
    return files


def run_turnaround(
    gw: Gateway,
    orthanc: OrthancServer,
    data: Path,
    *,
    ct_slices: int,
    ct_size: int,
    cr_size: int,
    timeout: float,
    repeats: int = 1,
    counted: bool = True,
) -> list[Turnaround]:
    """A CT series, then (after it is delivered) a CR study, `repeats` times: one study in flight at a time.
    Each also as "counted": every instance carries ImagesInAcquisition, so the study completes
    when the last one arrives instead of after the quiet period (same gateway, same run)."""
    results = []
    cases = [
        ("CT", lambda uid, d: make_ct_series(d, ct_slices, ct_size, ct_size, study_uid=uid, seed=1)),
        ("CR", lambda uid, d: [make_cr(d, cr_size, cr_size, study_uid=uid, seed=2)]),
    ]
    if counted:
        cases += [
            (
                "CT counted",
                lambda uid, d: with_count(make_ct_series(d, ct_slices, ct_size, ct_size, study_uid=uid, seed=1)),
            ),
            ("CR counted", lambda uid, d: with_count([make_cr(d, cr_size, cr_size, study_uid=uid, seed=2)])),
        ]
    for (label, make), rep in ((c, r) for r in range(repeats) for c in cases):
        before = moved_bytes(gw.worker_logs())
        uid = new_uid()
        files = make(uid, data / f"{gw.profile}-{gw.workers}-{label}-{rep}")
        _send(files, gw)
        tl = wait_timelines(gw.db_url, [uid], timeout)[uid]
        n_out, held = outputs_in_orthanc(gw.db_url, orthanc, uid)
        logs = gw.worker_logs()
        t = turnaround(tl, gw.quiet, pipeline_seconds(logs), held, f"{label} ({len(files)} inst)", received_times(logs))
        t.outputs = n_out
        t.met = t.met and held == n_out
        phases = job_phases(logs)
        for j in t.per_job:
            j.update(phases.get(j["id"], {}))
        if gw.split == "remote":
            t.bytes_moved = moved_bytes(logs) - before
        results.append(t)
    return results


@dataclass
class Throughput:
    workers: int
    split: str
    profile: str
    studies: int
    seconds: float  # first send -> last output stored in Orthanc
    studies_per_min: float
    outputs: int
    in_orthanc: int
    failed_jobs: int
    bytes_per_study: float | None = None  # remote workers: over HTTP (WADO-RS in + outputs up)


def run_throughput(
    gw: Gateway, orthanc: OrthancServer, data: Path, *, studies: int, cr_size: int, timeout: float
) -> Throughput:
    """`studies` single-image CR studies, one storescu association each, sent back to back."""
    sets = []
    for i in range(studies):
        uid = new_uid()
        sets.append(
            (uid, [make_cr(data / f"tp-{gw.profile}-{gw.workers}-{i}", cr_size, cr_size, study_uid=uid, seed=i)])
        )
    before = moved_bytes(gw.worker_logs())
    t0 = datetime.now(UTC)
    for _, files in sets:
        _send(files, gw)
    tls = wait_timelines(gw.db_url, [u for u, _ in sets], timeout)
    ends = []
    outputs = held = failed = 0
    for uid, tl in tls.items():
        jobs = [j for r in tl["revisions"] for j in r["jobs"]]
        failed += sum(j["state"] != "done" for j in jobs)
        ends += [_ts(d["done_at"]) for j in jobs for d in j["deliveries"] if d["done_at"]]
        n, h = outputs_in_orthanc(gw.db_url, orthanc, uid)
        outputs += n
        held += h
    seconds = (max(ends) - t0).total_seconds() if ends else float("nan")
    return Throughput(
        gw.workers,
        gw.split,
        gw.profile,
        studies,
        round(seconds, 2),
        round(studies * 60.0 / seconds, 2),
        outputs,
        held,
        failed,
        round((moved_bytes(gw.worker_logs()) - before) / studies) if gw.split == "remote" else None,
    )


def run(
    *,
    ct_slices: int = 100,
    ct_size: int = 128,
    cr_size: int = 256,
    studies: int = 6,
    workers: tuple[int, ...] = (1, 2),
    profiles: tuple[str, ...] = ("default", "tuned"),
    quiet: float = 2.0,
    repeats: int = 3,
    counted: bool = True,
    split: str | tuple[str, ...] = "node",
    timeout: float = 600.0,
    keep: Path | None = None,
) -> dict[str, Any]:
    splits = (split,) if isinstance(split, str) else tuple(split)
    for p in profiles:
        if p not in PROFILES:
            raise ValueError(f"unknown profile {p!r}; choose from {', '.join(PROFILES)}")
    figures: dict[str, Any] = {
        "ct_slices": ct_slices, "ct_size": ct_size, "cr_size": cr_size, "studies": studies, "quiet_s": quiet,
        "repeats": repeats, "split": list(splits),
        "profiles": {p: PROFILES[p] for p in profiles}, "target_overhead_s": TARGET_OVERHEAD_S,
        "model": "tiny (random weights) on CPU", "started": datetime.now(UTC).isoformat(),
        "load_before": os.getloadavg(), "turnaround": [], "throughput": [],
    }  # fmt: skip
    with ExitStack() as stack:
        root = keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-")))
        orthanc = stack.enter_context(OrthancServer(root / "orthanc"))
        data = root / "data"
        combos: list[tuple[int, str]] = []
        for n in workers:
            for sp in splits:
                effective = "serve" if n == 1 and sp != "remote" else sp
                if (n, effective) not in combos:
                    combos.append((n, effective))
        for profile in profiles:
            for n, sp in combos:
                gw = Gateway(
                    root / f"gw-{profile}-{n}-{sp}", orthanc, workers=n, quiet=quiet, profile=profile, split=sp
                )
                with gw:
                    if n == 1:
                        for t in run_turnaround(
                            gw, orthanc, data, ct_slices=ct_slices, ct_size=ct_size, cr_size=cr_size,
                            timeout=timeout, repeats=repeats, counted=counted,
                        ):  # fmt: skip
                            figures["turnaround"].append({"profile": profile, "workers": n, "split": sp, **asdict(t)})
                    tp = run_throughput(gw, orthanc, data, studies=studies, cr_size=cr_size, timeout=timeout)
                    figures["throughput"].append(asdict(tp))
        figures["summary"] = summarise(figures["turnaround"])
        figures["load_after"] = os.getloadavg()
    return figures


def _cell(v: float | None, bold: bool) -> str:
    text = "-" if v is None else f"{v:.2f}"
    return f"[bold]{text}[/]" if bold else text


_COMPONENTS = (
    "total_s", "compute_s", "overhead_s", "completion_lag_s", "planning_s", "pickup_s", "broker_wait_s", "dispatch_s",
    "job_io_s", "delivery_tail_s",
)  # fmt: skip


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (profile, study): the run with the median overhead (its breakdown adds up) and the spread."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["profile"], r.get("split", "serve"), r["study"]), []).append(r)
    out = []
    for rs in groups.values():
        ordered = sorted(rs, key=lambda r: r["overhead_s"])
        median = ordered[(len(ordered) - 1) // 2]
        out.append(
            {
                **median,
                "n": len(rs),
                "overhead_min_s": ordered[0]["overhead_s"],
                "overhead_max_s": ordered[-1]["overhead_s"],
                # Means of every component over the runs (the median run's breakdown adds up; these need not).
                "mean": {
                    k: round(sum(r[k] for r in rs) / len(rs), 3)
                    for k in _COMPONENTS
                    if all(r[k] is not None for r in rs)
                },
                "all_met": all(r["met"] for r in rs),
            }
        )
    return out


def print_figures(fig: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    t = Table(
        title=(
            f"Turnaround overhead (target < {fig['target_overhead_s']:g} s) = last instance received -> last output "
            f"stored in Orthanc, minus the {fig['quiet_s']:g} s quiet period (if waited for) and the model's compute\n"
            f"CT {fig['ct_slices']} slices {fig['ct_size']}x{fig['ct_size']}, CR {fig['cr_size']}x{fig['cr_size']}, "
            f"{fig['model']}"
        )
    )
    rows = [
        ("total s", "total_s"), ("  quiet period (configured)", "quiet_s"), ("  model compute", "compute_s"),
        ("OVERHEAD s", "overhead_s"), ("  completion lag beyond quiet", "completion_lag_s"),
        ("  planning (complete -> jobs)", "planning_s"), ("  pickup (ready -> claimed)", "pickup_s"),
        ("    broker polling (-> received)", "broker_wait_s"), ("    pool + claim (-> claimed)", "dispatch_s"),
        ("  job I/O (load, write, record)", "job_io_s"), ("  delivery tail (-> Orthanc ack)", "delivery_tail_s"),
    ]  # fmt: skip
    t.add_column("seconds (median run)")
    runs = fig.get("summary") or summarise(fig["turnaround"])
    for r in runs:
        split = r.get("split", "serve")
        t.add_column(
            f"{r['profile']}\n{r['study']}" + ("\nremote worker" if split == "remote" else ""), justify="right"
        )
    for name, key in rows:
        bold = name.startswith("OVERHEAD")
        t.add_row(f"[bold]{name}[/]" if bold else name, *(_cell(r[key], bold) for r in runs))
    t.add_row("overhead min / max", *(f"{r['overhead_min_s']:.2f} / {r['overhead_max_s']:.2f}" for r in runs))
    t.add_row("overhead mean", *(f"{r['mean']['overhead_s']:.2f}" for r in runs))
    t.add_row("completed because", *(r.get("completed_because", "") for r in runs))
    t.add_row("runs", *(str(r["n"]) for r in runs))
    t.add_row("outputs in Orthanc", *(f"{r['in_orthanc']}/{r['outputs']}" for r in runs))
    if any(r.get("bytes_moved") is not None for r in runs):
        t.add_row("bytes over HTTP", *("-" if r.get("bytes_moved") is None else str(r["bytes_moved"]) for r in runs))
    t.add_row("median < 2 s", *("[green]met[/]" if r["met"] else "[red]NOT met[/]" for r in runs))
    console.print(t)
    for r in runs:
        jobs = "; ".join(
            f"#{j['id']} {j['kind']}: pickup {j['pickup_s']} s, run {j['run_s']} s (compute {j['compute_s']} s), "
            f"delivered +{j['delivered_s']} s"
            for j in r["per_job"]
        )
        console.print(f"  [{r['profile']}] {r['study']}: {jobs}")
    tp = Table(title=f"Throughput: {fig['studies']} CR studies back to back, first send -> last output in Orthanc")
    for c in (
        "profile",
        "workers",
        "processes",
        "seconds",
        "studies/min",
        "outputs in Orthanc",
        "failed jobs",
        "bytes/study",
    ):
        tp.add_column(c, justify="right")
    for r in fig["throughput"]:
        procs = (
            f"node + {r['workers']} remote worker"
            if r["split"] == "remote"
            else "serve"
            if r["workers"] == 1
            else (f"node + {r['workers']} worker" if r["split"] == "node" else f"serve + {r['workers'] - 1} worker")
        )
        tp.add_row(
            r["profile"], str(r["workers"]), procs, str(r["seconds"]), str(r["studies_per_min"]),
            f"{r['in_orthanc']}/{r['outputs']}", str(r["failed_jobs"]),
            "-" if r.get("bytes_per_study") is None else str(r["bytes_per_study"]),
        )  # fmt: skip
    console.print(tp)
    console.print(
        f"load average before {tuple(round(x, 2) for x in fig['load_before'])}, "
        f"after {tuple(round(x, 2) for x in fig.get('load_after', ()))} ({os.cpu_count()} CPUs)"
    )


def main(out: str | None = None, **kw: Any) -> int:
    """Run, print the tables, write JSON to `out`. 0 when every turnaround met the target and nothing failed."""
    fig = run(**kw)
    print_figures(fig)
    if out:
        Path(out).write_text(json.dumps(fig, indent=2, default=str))
    bad = [r for r in fig.get("summary", []) if not r["met"]]
    lost = [r for r in fig["throughput"] if r["failed_jobs"] or r["in_orthanc"] != r["outputs"]]
    return 1 if lost else (2 if bad else 0)


def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--ct-slices", type=int, default=100)
    p.add_argument("--ct-size", type=int, default=128, help="CT slice rows = columns")
    p.add_argument("--cr-size", type=int, default=256, help="CR rows = columns")
    p.add_argument("--studies", type=int, default=6, help="CR studies for the throughput run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--profiles", nargs="+", default=["default", "tuned"], choices=sorted(PROFILES))
    p.add_argument("--quiet", type=float, default=2.0, help="study and series quiet period, seconds")
    p.add_argument("--repeats", type=int, default=3, help="turnaround runs per study type and profile (median shown)")
    p.add_argument(
        "--no-counted", dest="counted", action="store_false",
        help="leave out the CT/CR cases completed by their ImagesInAcquisition count",
    )  # fmt: skip
    p.add_argument(
        "--split", nargs="+", default=["node"], choices=list(SPLITS),
        help="N > 1 workers: `node --api` + N `worker` processes, or `serve` + N-1 extra `worker` processes; "
        "remote: `node --api` + N workers without the node's disk (also for N = 1); several: each in turn",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs, DBs)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return main(
        out=a.out, ct_slices=a.ct_slices, ct_size=a.ct_size, cr_size=a.cr_size, studies=a.studies,
        workers=tuple(a.workers), profiles=tuple(a.profiles), quiet=a.quiet, repeats=a.repeats, counted=a.counted,
        split=tuple(a.split), timeout=a.timeout, keep=a.keep,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(_cli())
