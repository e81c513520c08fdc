"""Running one job on a worker: claim, heartbeat, load sources, run, record outputs atomically.

Exactly-once outputs: output objects are written to storage first (fsync + atomic rename),
then ONE transaction inserts their JobOutput rows, their outbox rows and marks the job done,
and only if this worker still holds the job's claim. A worker killed before that commit
leaves files no row references (nothing is delivered, nothing recorded); the re-run writes
a fresh set and records it once. Unreferenced files are harmless and can be found by
comparing storage/objects with the instance, outbox and job_output tables.

Where sources come from and outputs go is a `JobIO`: `LocalIO` (the storage path shared with
the node) or `dicom_node.jobs.remote.RemoteIO` (the node's HTTP API; the node then runs
`commit_outputs`, the same transaction, in `dicom_node.jobs.uploads`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pydicom import Dataset, dcmread
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node import leases
from dicom_node.export.outbox import EnqueueError, enqueue, part10_bytes
from dicom_node.jobs.models import DONE, FAILED, PLANNED, QUEUED, RUNNING, Job, JobOutput
from dicom_node.jobs.settings import one_line, utcnow
from dicom_node.jobs.source_cache import SourceCache
from dicom_node.models import Instance, Series, Study
from dicom_node.storage import Storage, StoredObject

log = logging.getLogger("dicom_node.jobs.runner")

# What execute_job reports (also the Celery task's return value, for the worker log).
RAN_DONE = "done"
RAN_FAILED = "failed"
SKIPPED = "skipped"  # duplicate delivery, job done/failed/held elsewhere
RETRYING = "retrying"  # crashed (unexpected exception); back to "planned" for another attempt
LOST = "lost"  # the claim moved to another worker while this one ran (lease expired)


class JobInputError(Exception):
    """The job's sources cannot be loaded (missing, unreadable); `reason` is for the job record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Claim:
    job: Job  # a detached snapshot taken at claim time
    token: str


def claim(engine: Engine, job_id: int, worker: str | None = None, *, now: datetime | None = None) -> Claim | None:
    """planned/queued (or running with an expired lease) -> running, attempts + 1, under a new token.

    None when the job is done, failed, held by a live worker, unknown, or out of attempts (then
    it is marked failed here, with the reason).
    """
    now = now or utcnow()
    worker = worker or worker_name()
    with Session(engine, expire_on_commit=False) as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s is not in the database; message ignored", job_id)
            return None
        claimable = (col(Job.state).in_([PLANNED, QUEUED])) | ((col(Job.state) == RUNNING) & leases.expired(Job, now))
        token, n = leases.claim(
            s,
            Job,
            [col(Job.id) == job_id, col(Job.attempts) < col(Job.max_attempts), claimable],
            now=now,
            lease_seconds=job.lease_seconds,
            state=RUNNING,
            attempts=Job.attempts + 1,
            worker=worker[:255],
            started_at=now,
            updated_at=now,
            error=None,
        )
        if n:
            s.commit()
            s.expire_all()
            job = s.get(Job, job_id)
            assert job is not None
            s.expunge(job)
            return Claim(job, token)
        s.rollback()
        s.expire_all()
        job = s.get(Job, job_id)
        assert job is not None
        if job.state in (PLANNED, QUEUED) and job.attempts >= job.max_attempts:
            s.execute(
                update(Job)
                .where(col(Job.id) == job_id, col(Job.state).in_([PLANNED, QUEUED]))
                .values(
                    state=FAILED,
                    finished_at=now,
                    updated_at=now,
                    error=f"gave up after {job.attempts} attempt(s) (max_attempts {job.max_attempts})",
                )
            )
            s.commit()
            log.error("job %s failed: out of attempts", job_id)
        elif job.state == RUNNING:
            log.info("job %s is running on %s under a valid lease; duplicate delivery ignored", job_id, job.worker)
        else:
            log.info("job %s is %s; duplicate delivery ignored", job_id, job.state)
    return None


def renew(engine: Engine, claim_: Claim, *, now: datetime | None = None) -> bool:
    """Extend the lease; False when this worker no longer holds the job."""
    now = now or utcnow()
    n = leases.renew(
        engine,
        Job,
        claim_.token,
        now=now,
        lease_seconds=claim_.job.lease_seconds,
        where=[col(Job.id) == claim_.job.id, col(Job.state) == RUNNING],
        updated_at=now,
    )
    if n:
        return True
    # A beat that lands after this worker recorded the job done/failed (token kept) is not a loss.
    with Session(engine) as s:
        job = s.get(Job, claim_.job.id)
        return job is not None and job.claim_token == claim_.token and job.state in (DONE, FAILED)


def heartbeat(engine: Engine, claim_: Claim) -> leases.LeaseKeeper:
    """Renews the job's lease every lease/3 seconds while the model runs; `.lost` once taken over."""
    return leases.LeaseKeeper(
        lambda: int(renew(engine, claim_)),
        claim_.job.lease_seconds,
        name=f"job {claim_.job.id}",
        stop_when_lost=True,
        min_interval=0.2,  # a DB write per beat: tiny test leases must not turn into a busy loop
    )


@dataclass(frozen=True)
class SourceRow:
    """One source instance of a job as the index records it."""

    series_uid: str
    relpath: str
    sha256: str
    size: int = 0  # bytes as stored


def source_rows(engine: Engine, job: Job) -> list[SourceRow]:
    """The job's source instances from the index, in series / instance-number order.

    Raises JobInputError when the study or all of its series are gone."""
    with Session(engine) as s:
        study = s.exec(select(Study).where(Study.study_instance_uid == job.study_instance_uid)).first()
        if study is None:
            raise JobInputError("the study is no longer in the index")
        rows = s.exec(
            select(Series.series_instance_uid, Instance.relpath, Instance.sha256, Instance.size)
            .join(Series, col(Series.id) == Instance.series_pk)
            .where(
                Instance.study_pk == study.id,
                col(Series.series_instance_uid).in_(list(job.series_uids)),
                Instance.revision <= job.revision,
            )
            .order_by(col(Series.series_instance_uid), col(Instance.instance_number), col(Instance.id))
        ).all()
    if not rows:
        raise JobInputError("none of the job's series has instances in the index")
    return [SourceRow(series, relpath, sha, size) for series, relpath, sha, size in rows]


def read_dataset(data: bytes | Any) -> Dataset:
    """A source instance parsed from bytes (or a path); JobInputError when it cannot be read."""
    try:
        return dcmread(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)
    except FileNotFoundError:
        raise JobInputError("a source instance file is missing from storage") from None
    except Exception as exc:
        raise JobInputError(f"a source instance cannot be read: {one_line(str(exc), 300)}") from None


def load_datasets(engine: Engine, storage: Storage, job: Job) -> list[Dataset]:
    """The job's source instances, read from storage paths recorded in the index (never from received values)."""
    return read_sources(storage, source_rows(engine, job), {})


def read_sources(storage: Storage, rows: Sequence[SourceRow], cached: dict[str, Dataset]) -> list[Dataset]:
    """`rows` as datasets: from `cached` by sha256, else parsed from storage. JobInputError when one cannot be read."""
    datasets = []
    for r in rows:
        ds = cached.get(r.sha256)
        if ds is None:
            try:
                path = storage.path(r.relpath)
            except ValueError:
                raise JobInputError("a source instance's recorded path is not inside the storage root") from None
            ds = read_dataset(path)
        datasets.append(ds)
    return datasets


class _Prewritten:
    """Storage for enqueue() that returns objects this job already wrote (so the DB transaction
    does no disk writes); anything else goes to the real storage."""

    def __init__(self, storage: Storage, written: dict[str, StoredObject]) -> None:
        self.storage = storage
        self.written = written

    def write(self, data: bytes) -> StoredObject:
        found = self.written.get(hashlib.sha256(data).hexdigest())
        return found if found is not None else self.storage.write(data)


@dataclass
class Output:
    dataset: Dataset
    kind: str
    source_series_uid: str | None = None


@dataclass(frozen=True)
class EncodedOutput:
    """An output object as the Part 10 bytes that are stored and delivered, with its header."""

    data: bytes
    header: Dataset
    kind: str
    source_series_uid: str | None = None


def encode_outputs(outputs: Sequence[Output]) -> list[EncodedOutput]:
    """Part 10 bytes of every output (raises EnqueueError for an object that cannot be encoded)."""
    encoded = []
    for o in outputs:
        data, header = part10_bytes(o.dataset)
        encoded.append(EncodedOutput(data, header, o.kind, o.source_series_uid))
    return encoded


def job_destinations(configured: Sequence[str], job: Job) -> list[str]:
    """Where a job's outputs go: the job's own `destinations` parameter, else every configured one."""
    wanted = (job.params or {}).get("destinations")
    return list(wanted) if wanted else list(configured)


def commit_outputs(
    engine: Engine,
    storage: Storage,
    job_id: int,
    token: str,
    encoded: Sequence[EncodedOutput],
    destinations: Sequence[str],
    *,
    summary: str | None = None,
    model_info: dict[str, Any] | None = None,
) -> list[JobOutput] | None:
    """Store encoded outputs, then record them + their outbox rows + job done in ONE transaction,
    only while job `job_id` is running under claim `token`.

    Shared by local workers (`complete`) and the node's upload route for remote workers
    (`dicom_node.jobs.remote`). None when the claim was lost meanwhile: nothing recorded (the
    files written are unreferenced, harmless).
    """
    written: dict[str, StoredObject] = {}
    stored_list: list[StoredObject] = []
    for e in encoded:
        stored = storage.write(e.data)  # durable before any row points at it
        written[stored.sha256] = stored
        stored_list.append(stored)
    pre = _Prewritten(storage, written)
    now = utcnow()
    with Session(engine, expire_on_commit=False) as s:
        # Lock the job row first (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers)
        # so the sweeper cannot re-queue it between this check and the commit.
        job = s.exec(select(Job).where(Job.id == job_id).with_for_update()).one()
        if job.state != RUNNING or job.claim_token != token:  # the claim moved on
            s.rollback()
            return None
        records = []
        for e, stored in zip(encoded, stored_list, strict=True):
            outbox_ids: list[int] = []
            if destinations:
                rows = enqueue(s, pre, e.data, destinations, job_id=job_id, now=now)
                outbox_ids = [r.id for r in rows if r.id is not None]
            record = JobOutput(
                job_id=job_id or 0,
                sop_instance_uid=str(e.header.SOPInstanceUID),
                sop_class_uid=str(e.header.SOPClassUID),
                series_instance_uid=str(e.header.get("SeriesInstanceUID", "")) or None,
                source_series_uid=e.source_series_uid,
                kind=e.kind,
                relpath=stored.relpath,
                sha256=stored.sha256,
                size=stored.size,
                outbox_ids=outbox_ids,
                created_at=now,
            )
            s.add(record)
            records.append(record)
        job.state = DONE
        job.finished_at = now
        job.updated_at = now
        job.lease_until = None
        job.error = None
        job.summary = summary
        job.model_info = model_info
        s.add(job)
        s.commit()
    return records


def complete(
    engine: Engine,
    storage: Storage,
    claim_: Claim,
    outputs: Sequence[Output],
    destinations: Sequence[str],
    *,
    summary: str | None = None,
    model_info: dict[str, Any] | None = None,
) -> list[JobOutput] | None:
    """Store outputs, then record them + their outbox rows + job done in one transaction.

    None when the claim was lost meanwhile (another worker owns the job now): nothing recorded.
    """
    assert claim_.job.id is not None
    return commit_outputs(
        engine,
        storage,
        claim_.job.id,
        claim_.token,
        encode_outputs(outputs),
        destinations,
        summary=summary,
        model_info=model_info,
    )


def fail(engine: Engine, claim_: Claim, reason: str, *, now: datetime | None = None) -> bool:
    now = now or utcnow()
    with Session(engine) as s:
        n = s.execute(
            update(Job)
            .where(col(Job.id) == claim_.job.id, leases.held(Job, claim_.token), col(Job.state) == RUNNING)
            .values(state=FAILED, error=one_line(reason), finished_at=now, updated_at=now, lease_until=None)
        ).rowcount  # type: ignore[attr-defined]
        s.commit()
    return bool(n)


def is_input_error(exc: BaseException) -> bool:
    """True for the typed "this input cannot be processed" errors (JobInputError and the
    pipelines' INPUT_ERRORS); anything else is a crash (a bug, an environment fault)."""
    from inference.pipelines.errors import INPUT_ERRORS

    return isinstance(exc, (JobInputError, *INPUT_ERRORS))


def failure_reason(exc: BaseException) -> str:
    """One readable line for the job record (the traceback goes to the log only).

    Input errors give their own sentence; anything else is reported as an internal error by
    exception type only (its text may hold raw values, even patient data, and is no sentence)."""
    if is_input_error(exc):
        reason = getattr(exc, "reason", None)
        if not (isinstance(reason, str) and reason.strip()):
            reason = " ".join(str(exc).split()) or type(exc).__name__
        return one_line(reason)
    return one_line(f"internal error ({type(exc).__name__}) in the worker, not a problem with the input")


def crash(engine: Engine, claim_: Claim, exc: BaseException, *, now: datetime | None = None) -> bool:
    """Record an unexpected exception: crashes + 1, then back to "planned" for a retry while
    attempts remain (the sweeper publishes it), else "failed" as an internal error.

    Returns True when the job will be retried."""
    now = now or utcnow()
    job = claim_.job
    retry = job.attempts < job.max_attempts
    reason = failure_reason(exc)
    values: dict[str, Any] = {"updated_at": now, "lease_until": None, "crashes": Job.crashes + 1}
    if retry:
        values.update(
            state=PLANNED, error=one_line(f"{reason}; retrying (attempt {job.attempts} of {job.max_attempts})")
        )
    else:
        values.update(
            state=FAILED,
            finished_at=now,
            error=one_line(f"{reason}, on every one of {job.attempts} attempt(s); the worker log has the traceback"),
        )
    with Session(engine) as s:
        s.execute(
            update(Job)
            .where(col(Job.id) == job.id, col(Job.claim_token) == claim_.token, col(Job.state) == RUNNING)
            .values(**values)
        )
        s.commit()
    return retry


RunFn = Callable[[Job, list[Dataset]], tuple[list[Output], str | None, dict[str, Any] | None]]


class JobIO(Protocol):
    """Where a worker's job reads its sources and records its outputs: the node's storage path
    (`LocalIO`) or the node's HTTP API (`dicom_node.jobs.remote.RemoteIO`, no shared disk)."""

    def load(self, engine: Engine, job: Job) -> list[Dataset]:
        """The job's source datasets; JobInputError when they cannot be had."""
        ...

    def record(
        self,
        engine: Engine,
        claim_: Claim,
        outputs: Sequence[Output],
        *,
        summary: str | None,
        model_info: dict[str, Any] | None,
    ) -> int | None:
        """Record the outputs + outbox rows + job done at once; the number of outputs, or None
        when the claim was lost (nothing recorded). EnqueueError: an output cannot be queued."""
        ...


@dataclass
class LocalIO:
    """Sources read from, and outputs written to, the storage path this process shares with the node.

    With a `SourceCache` the next job of the same study gets the sources this job parsed
    (dicom_node.jobs.source_cache: put back only once this job's outputs are recorded)."""

    storage: Storage
    destinations: Callable[[Job], Sequence[str]]
    cache: SourceCache | None = None

    def load(self, engine: Engine, job: Job) -> list[Dataset]:
        started = time.perf_counter()
        rows = source_rows(engine, job)
        cached = self.cache.take(r.sha256 for r in rows) if self.cache is not None else {}
        datasets = read_sources(self.storage, rows, cached)
        if self.cache is not None:
            self.cache.hold({r.sha256: ds for r, ds in zip(rows, datasets, strict=True)}, sum(r.size for r in rows))
        log.info(
            "job %s: %d source instance(s) in %.3f s (%d parsed, %d from the previous job)",
            job.id,
            len(rows),
            time.perf_counter() - started,
            len(rows) - sum(1 for r in rows if r.sha256 in cached),
            sum(1 for r in rows if r.sha256 in cached),
        )
        return datasets

    def record(
        self,
        engine: Engine,
        claim_: Claim,
        outputs: Sequence[Output],
        *,
        summary: str | None,
        model_info: dict[str, Any] | None,
    ) -> int | None:
        recorded = complete(
            engine,
            self.storage,
            claim_,
            outputs,
            self.destinations(claim_.job),
            summary=summary,
            model_info=model_info,
        )
        if recorded is not None and self.cache is not None:
            self.cache.keep_held()
        return None if recorded is None else len(recorded)


def execute_job(
    engine: Engine,
    storage: Storage | JobIO,
    job_id: int,
    run: RunFn,
    destinations: Callable[[Job], Sequence[str]],
    *,
    worker: str | None = None,
) -> str:
    """Claim and run one job end to end; never raises for a job's own failure."""
    job_io: JobIO = LocalIO(storage, destinations) if isinstance(storage, Storage) else storage
    c = claim(engine, job_id, worker)
    if c is None:
        return SKIPPED
    log.info("job %s (%s) claimed: attempt %d of %d", job_id, c.job.kind, c.job.attempts, c.job.max_attempts)
    t0 = time.perf_counter()
    with heartbeat(engine, c) as hb:
        try:
            datasets = job_io.load(engine, c.job)
            t1 = time.perf_counter()
            outputs, summary, model_info = run(c.job, datasets)
            t2 = time.perf_counter()
            if hb.lost.is_set():
                return LOST
            recorded = job_io.record(engine, c, outputs, summary=summary, model_info=model_info)
            t3 = time.perf_counter()
        except EnqueueError as exc:
            log.error("job %s: an output cannot be queued for delivery: %s", job_id, exc)
            fail(engine, c, f"an output object cannot be queued for delivery: {exc}")
            return RAN_FAILED
        except Exception as exc:
            reason = failure_reason(exc)
            # If even these writes fail (DB down), the lease runs out and the sweeper re-queues the job.
            if is_input_error(exc):
                log.warning("job %s failed on its input: %s", job_id, reason)
                fail(engine, c, reason)
                return RAN_FAILED
            # A crash: counted, retried, logged with its traceback (dicom_node.logs withholds the
            # exception's message unless log_phi is on: it may quote a patient's values).
            retried = crash(engine, c, exc)
            log.error(
                "job %s crashed (%s)%s",
                job_id,
                type(exc).__name__,
                "; it will be retried" if retried else f"; failed after {c.job.attempts} attempt(s)",
                exc_info=True,
            )
            return RETRYING if retried else RAN_FAILED
    if recorded is None:
        log.warning("job %s: claim lost before recording results; another run owns it", job_id)
        return LOST
    # Where the job's time went (seconds): its own I/O is "sources" + "record".
    log.info(
        "job %s done: %d output object(s) (sources %.3f s, run %.3f s, record %.3f s)",
        job_id,
        recorded,
        t1 - t0,
        t2 - t1,
        t3 - t2,
    )
    return RAN_DONE
