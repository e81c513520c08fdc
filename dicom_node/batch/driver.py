"""The `unimedvl batch` process: create or resume a batch, list its items, feed the workers.

Durable first: the batch row and every item row are committed (state "pending") before any
message is published. Then, every `poll` seconds, the driver
- returns items whose worker stopped renewing its lease (killed, host lost) to "pending";
- re-publishes "queued" items no worker took within `queued_timeout` (the embedded transport
  hides a taken message, a RabbitMQ queue can be purged: the DB decides);
- publishes "pending" items (after a back-off for retried ones) while fewer than `window`
  are in flight, and none while clinical jobs are waiting in the job table: clinical work
  always goes first, and at most `window` batch messages ever sit ahead of it in a broker.
Killing the driver loses nothing: the same command (or `--resume ID`) carries on from the DB;
re-published messages are harmless because workers claim items with a conditional UPDATE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node.batch.deidentify import DeidOptions
from dicom_node.batch.execute import BATCH_QUEUE, RUN_ITEM
from dicom_node.batch.models import ACTIVE, FETCHING, PENDING, QUEUED, RUNNING, BatchItem, BatchRun
from dicom_node.batch.sources import Source, StudyRef
from dicom_node.jobs.settings import as_utc, utcnow

log = logging.getLogger("dicom_node.batch.driver")

MARKER = ".unimedvl-batch"


class BatchError(Exception):
    """A batch cannot start or resume; `reason` is one readable sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class BatchRequest:
    """What the user asked for (CLI flags / config); everything a worker needs goes into options."""

    source: str
    out_dir: Path
    rules: list[dict[str, Any]]
    deidentify: DeidOptions = field(default_factory=DeidOptions)
    query: dict[str, str] = field(default_factory=dict)
    fetch_from: str | None = None
    retrieve: str = "get"
    move_port: int = 0
    calling_ae: str = "UNIMEDVL"
    max_fetch: int = 2
    max_attempts: int = 3
    lease_seconds: float = 60.0
    scratch_dir: str | None = None
    send: list[str] = field(default_factory=list)  # [[destinations]] names the outputs also go to

    def key(self, model_version: str) -> str:
        payload = {
            "source": self.source,
            "out": str(self.out_dir.resolve()),
            "rules": self.rules,
            "deidentify": self.deidentify.as_dict(),
            "query": self.query,
            "fetch_from": self.fetch_from,
            "model": model_version,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def options(self) -> dict[str, Any]:
        return {
            "rules": self.rules,
            "deidentify": self.deidentify.as_dict(),
            "secret": secrets.token_hex(16),  # seeds the pseudonyms; same for every worker of this batch
            "query": self.query,
            "fetch_from": self.fetch_from,
            "retrieve": self.retrieve,
            "move_port": self.move_port,
            "calling_ae": self.calling_ae,
            "max_fetch": self.max_fetch,
            "scratch_dir": self.scratch_dir,
            "send": self.send,
        }


def create_or_resume(db: Engine, req: BatchRequest, model_version: str) -> tuple[BatchRun, bool]:
    """The batch this request names (same source, DIR, rules, options and model): resumed if it
    exists, else created. Returns (batch, created). Raises BatchError when DIR holds another batch."""
    key = req.key(model_version)
    out = req.out_dir.resolve()
    marker = out / MARKER
    if marker.exists() and marker.read_text().strip() != key:
        raise BatchError(
            f"{out} holds the outputs of another batch (different source, tasks or options): "
            "use another --out, or --resume that batch's id"
        )
    now = utcnow()
    with Session(db, expire_on_commit=False) as s:
        found = s.exec(select(BatchRun).where(BatchRun.key == key)).first()
        if found is not None:
            return found, False
        batch = BatchRun(
            key=key,
            source=req.source,
            out_dir=str(out),
            options=req.options(),
            model_version=model_version,
            created_at=now,
            updated_at=now,
        )
        s.add(batch)
        s.commit()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")
    return batch, True


def load_batch(db: Engine, batch_id: int) -> BatchRun:
    with Session(db, expire_on_commit=False) as s:
        batch = s.get(BatchRun, batch_id)
    if batch is None:
        raise BatchError(f"there is no batch {batch_id} in this database (see `unimedvl batch status`)")
    return batch


def _insert(db: Engine) -> Any:
    return pg_insert if db.dialect.name == "postgresql" else sqlite_insert


def enumerate_items(
    db: Engine,
    batch: BatchRun,
    refs: Iterable[StudyRef],
    *,
    max_attempts: int = 3,
    lease_seconds: float = 60.0,
    chunk: int = 500,
) -> int:
    """Insert one item per study (idempotent: listing again after a crash adds only what is new),
    then mark the batch "running". Returns the number of items."""
    if batch.state != "enumerating":
        return batch.items_total
    insert = _insert(db)

    def flush(rows: list[dict[str, Any]]) -> None:
        if rows:
            with Session(db) as s:
                s.execute(insert(BatchItem).values(rows).on_conflict_do_nothing(index_elements=["idempotency_key"]))
                s.commit()

    rows: list[dict[str, Any]] = []
    now = utcnow()
    for ref in refs:
        key = hashlib.sha256(f"{batch.key}\x1f{ref.study_instance_uid}".encode()).hexdigest()
        rows.append(
            {
                "batch_id": batch.id,
                "idempotency_key": key,
                "study_instance_uid": ref.study_instance_uid,
                "patient_id": (ref.patient_id or None) and ref.patient_id[:64],
                "locator": ref.locator,
                "state": PENDING,
                "attempts": 0,
                "max_attempts": max_attempts,
                "lease_seconds": lease_seconds,
                "created_at": now,
                "updated_at": now,
            }
        )
        if len(rows) >= chunk:
            flush(rows)
            rows = []
    flush(rows)
    with Session(db) as s:
        total = s.exec(select(func.count()).select_from(BatchItem).where(BatchItem.batch_id == batch.id)).one()
        s.execute(
            update(BatchRun)
            .where(col(BatchRun.id) == batch.id)
            .values(state="running", items_total=total, updated_at=utcnow())
        )
        s.commit()
    batch.state, batch.items_total = "running", total
    log.info("batch %s: %d item(s) listed", batch.id, total)
    return total


def clinical_waiting(db: Engine) -> int:
    """Clinical jobs planned or queued and not yet taken by a worker."""
    from dicom_node.jobs.models import PLANNED, Job
    from dicom_node.jobs.models import QUEUED as JOB_QUEUED

    with Session(db) as s:
        return s.exec(select(func.count()).select_from(Job).where(col(Job.state).in_([PLANNED, JOB_QUEUED]))).one()


class Driver:
    def __init__(
        self,
        db: Engine,
        batch: BatchRun,
        publish: Callable[[int], None],
        *,
        window: int = 4,
        poll: float = 0.25,
        retry_backoff: float = 1.0,
        queued_timeout: float = 600.0,
        yield_to_clinical: bool = True,
    ) -> None:
        self.db, self.batch, self.publish = db, batch, publish
        self.window = max(1, window)
        self.poll = poll
        self.retry_backoff = retry_backoff
        self.queued_timeout = queued_timeout
        self.yield_to_clinical = yield_to_clinical
        self.held_for_clinical = False
        self._republished_queued = False

    def sweep(self) -> int:
        """Items whose lease ran out -> pending (their attempt stays counted)."""
        now = utcnow()
        with Session(self.db) as s:
            n = s.execute(
                update(BatchItem)
                .where(
                    BatchItem.batch_id == self.batch.id,
                    col(BatchItem.state).in_([FETCHING, RUNNING]),
                    col(BatchItem.lease_until) < now,  # type: ignore[operator]
                )
                .values(state=PENDING, updated_at=now, error="the worker stopped renewing its lease (killed or lost)")
            ).rowcount  # type: ignore[attr-defined]
            s.commit()
        if n:
            log.warning("batch %s: %d item(s) whose worker was lost go back to pending", self.batch.id, n)
        return int(n or 0)

    def _republish_stale(self) -> int:
        now = utcnow()
        with Session(self.db) as s:
            q = select(BatchItem.id).where(BatchItem.batch_id == self.batch.id, BatchItem.state == QUEUED)
            if self._republished_queued:
                q = q.where(col(BatchItem.published_at) < now - timedelta(seconds=self.queued_timeout))  # type: ignore[operator]
            ids = list(s.exec(q))
        self._republished_queued = True  # on (re)start every queued item once: its message may be gone
        for item_id in ids:
            self.publish(item_id)
        if ids:
            with Session(self.db) as s:
                s.execute(update(BatchItem).where(col(BatchItem.id).in_(ids)).values(published_at=now))
                s.commit()
        return len(ids)

    def step(self) -> dict[str, int]:
        """One round: sweep, re-publish, publish new work. Returns counts of active items."""
        self.sweep()
        self._republish_stale()
        now = utcnow()
        with Session(self.db) as s:
            counts = dict(
                s.exec(
                    select(BatchItem.state, func.count())
                    .where(BatchItem.batch_id == self.batch.id, col(BatchItem.state).in_(ACTIVE))
                    .group_by(BatchItem.state)
                ).all()
            )
        in_flight = counts.get(QUEUED, 0) + counts.get(FETCHING, 0) + counts.get(RUNNING, 0)
        free = self.window - in_flight
        self.held_for_clinical = bool(self.yield_to_clinical and free > 0 and clinical_waiting(self.db))
        if free > 0 and counts.get(PENDING, 0) and not self.held_for_clinical:
            with Session(self.db) as s:
                candidates = s.exec(
                    select(BatchItem.id, BatchItem.attempts, BatchItem.updated_at)
                    .where(BatchItem.batch_id == self.batch.id, BatchItem.state == PENDING)
                    .order_by(col(BatchItem.attempts), col(BatchItem.id))
                    .limit(free * 4)
                ).all()
            ready = [
                i
                for i, attempts, updated in candidates
                if attempts == 0
                or as_utc(updated) <= now - timedelta(seconds=min(self.retry_backoff * 2 ** (attempts - 1), 60.0))  # type: ignore[operator]
            ][:free]
            for item_id in ready:
                self.publish(item_id)
                with Session(self.db) as s:
                    s.execute(
                        update(BatchItem)
                        .where(col(BatchItem.id) == item_id, BatchItem.state == PENDING)
                        .values(state=QUEUED, published_at=utcnow(), updated_at=utcnow())
                    )
                    s.commit()
        return counts

    def run(self, stop: threading.Event | None = None, on_progress: Callable[[], None] | None = None) -> bool:
        """Drive until no item is active (True) or `stop` is set (False)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            counts = self.step()
            if on_progress is not None:
                on_progress()
            if not counts:
                with Session(self.db) as s:
                    s.execute(
                        update(BatchRun)
                        .where(col(BatchRun.id) == self.batch.id)
                        .values(state="finished", finished_at=utcnow(), updated_at=utcnow())
                    )
                    s.commit()
                return True
            stop.wait(self.poll)
        return False


class CeleryPublisher:
    """Publishes `run_batch_item(id)` on the batch queue (embedded broker or RabbitMQ)."""

    def __init__(self, broker_url: str) -> None:
        from dicom_node.jobs.planner import Publisher

        self._inner = Publisher(broker_url)

    def __call__(self, item_id: int) -> None:
        self._inner.send(RUN_ITEM, [item_id], BATCH_QUEUE, max_retries=3)

    def close(self) -> None:
        self._inner.close()


def write_mapping_key(db: Engine, batch: BatchRun, path: Path) -> int:
    """original PatientID / StudyInstanceUID -> pseudonyms, as CSV (only when the user asks for it)."""
    import csv

    from dicom_node.batch.deidentify import Deidentifier

    d = Deidentifier(batch.options["secret"], DeidOptions.from_dict(batch.options.get("deidentify")))
    with Session(db) as s:
        items = s.exec(select(BatchItem).where(BatchItem.batch_id == batch.id).order_by(col(BatchItem.id))).all()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["PatientID", "PseudonymousPatientID", "StudyInstanceUID", "PseudonymousStudyInstanceUID"])
        for it in items:
            p = d.pseudonyms(it.patient_id, it.study_instance_uid)
            w.writerow(
                [
                    it.patient_id or "",
                    p["patient_id"] if it.patient_id else "",
                    it.study_instance_uid,
                    p["study_instance_uid"],
                ]
            )
    return len(items)


def dry_run(
    source: Source, req: BatchRequest, engine_loader: Callable[[], Any] | None, sample: int = 2
) -> dict[str, Any]:
    """List the studies and estimate the time from running the first `sample` ones in-process
    (nothing written, nothing recorded)."""
    import tempfile

    from dicom_node.batch.execute import process_study, read_datasets

    refs = list(source.studies())
    out: dict[str, Any] = {"studies": len(refs), "sampled": 0, "seconds_per_study": None, "tasks": {}}
    if not refs or engine_loader is None or sample <= 0:
        return out
    fake = BatchRun(
        key="dry-run",
        source=req.source,
        out_dir="",
        options=req.options(),
        model_version="",
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    model = engine_loader()
    times = []
    for ref in refs[:sample]:
        with tempfile.TemporaryDirectory(prefix="unimedvl-dry-run-") as scratch:
            started = time.monotonic()
            outcome = process_study(read_datasets(source.fetch(ref, Path(scratch))), fake, model, out_dir=None)
            times.append(time.monotonic() - started)
        for r in outcome.rows:
            key = r["task"] or r["state"]
            out["tasks"][key] = out["tasks"].get(key, 0) + 1
    out["sampled"] = len(times)
    out["seconds_per_study"] = round(sum(times) / len(times), 3)
    out["estimated_seconds_one_worker"] = round(out["seconds_per_study"] * len(refs), 1)
    return out
