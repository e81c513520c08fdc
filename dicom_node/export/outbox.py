"""Outbox operations: enqueue, claim with a lease, record outcomes, recover, re-queue.

Every state change is one short transaction. Claiming is a single conditional UPDATE
(``... WHERE state = 'pending'``), so two exporters never hold the same row; a row left
"sending" by a crashed exporter goes back to "pending" once its lease has expired.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node import leases
from dicom_node.db import newest_page
from dicom_node.export.models import DONE, FAILED, PENDING, SENDING, SUPERSEDED, OutboxRow
from dicom_node.export.wakeup import ALL, notify

log = logging.getLogger(__name__)


class EnqueueError(ValueError):
    """The object cannot be queued (not DICOM, or missing the identifiers delivery needs)."""


class StorageLike(Protocol):
    def write(self, data: bytes) -> Any: ...  # -> StoredObject(relpath, sha256, size)


def utcnow() -> datetime:
    """Aware UTC, the form every outbox timestamp is stored and returned in."""
    return datetime.now(UTC)


def as_utc(t: datetime | None) -> datetime:
    """Aware UTC; a naive value is taken to be UTC already."""
    if t is None:
        return utcnow()
    if t.tzinfo is None:
        return t.replace(tzinfo=UTC)
    return t.astimezone(UTC)


def part10_bytes(obj: Dataset | bytes) -> tuple[bytes, Dataset]:
    """The object as a DICOM Part 10 file (preamble + file meta) and its parsed header."""
    if isinstance(obj, bytes | bytearray):
        data = bytes(obj)
        try:
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception as exc:
            raise EnqueueError(f"not a DICOM file: {exc}") from exc
        if "TransferSyntaxUID" not in ds.file_meta:
            raise EnqueueError("DICOM bytes without file meta information (Transfer Syntax UID): pass a Part 10 file")
        if len(data) < 132 or data[128:132] != b"DICM":
            # Accept a bare file-meta stream but store a canonical Part 10 file.
            ds = dcmread(io.BytesIO(data))
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        return data, ds
    buf = io.BytesIO()
    try:
        obj.save_as(buf, enforce_file_format=True)
    except Exception as exc:
        raise EnqueueError(f"cannot encode the dataset as a DICOM file: {exc}") from exc
    return buf.getvalue(), obj


def _uid(ds: Dataset, keyword: str, *, required: bool) -> str | None:
    value = ds.get(keyword)
    if value in (None, ""):
        if required:
            raise EnqueueError(f"object has no {keyword}; it cannot be delivered")
        return None
    text = str(value)
    if len(text) > 64:
        raise EnqueueError(f"{keyword} longer than 64 characters")
    return text


@dataclass(frozen=True)
class _Identity:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None


def _identity(ds: Dataset) -> _Identity:
    sop_instance = _uid(ds, "SOPInstanceUID", required=True)
    sop_class = _uid(ds, "SOPClassUID", required=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    assert sop_instance and sop_class
    return _Identity(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        transfer_syntax_uid=ts,
        study_instance_uid=_uid(ds, "StudyInstanceUID", required=False),
        series_instance_uid=_uid(ds, "SeriesInstanceUID", required=False),
    )


def _destination_names(destinations: Iterable[Any]) -> list[str]:
    names: list[str] = []
    for d in destinations:
        name = d if isinstance(d, str) else getattr(d, "name", None)
        if not name:
            raise EnqueueError(f"destination {d!r} has no name")
        if name not in names:
            names.append(str(name))
    if not names:
        raise EnqueueError("no destination given")
    return names


def _insert_ignoring_duplicates(session: Session, values: list[dict[str, Any]]) -> None:
    dialect = session.get_bind().dialect.name
    table = OutboxRow.__table__  # type: ignore[attr-defined]
    if dialect == "postgresql":
        stmt = (
            pg_insert(table).values(values).on_conflict_do_nothing(index_elements=["sop_instance_uid", "destination"])
        )
    elif dialect == "sqlite":
        stmt = (
            sqlite_insert(table)
            .values(values)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid", "destination"])
        )
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise RuntimeError(f"unsupported database dialect {dialect}")
    session.execute(stmt)


def enqueue(
    db: Engine | Session,
    storage: StorageLike,
    obj: Dataset | bytes,
    destinations: Iterable[Any],
    *,
    job_id: int | None = None,
    fallback_of: int | None = None,
    now: datetime | None = None,
    not_before: datetime | None = None,
) -> list[OutboxRow]:
    """Write `obj` to storage (fsync'd, atomic) and queue it for every destination.

    Idempotent per (SOP Instance UID, destination): queueing the same object again returns the
    existing rows. With an Engine the rows are committed before this returns; with a Session
    they are flushed and the caller commits (so a job's results and its outbox rows can share
    one transaction). The exporter is woken when the rows commit (dicom_node.export.wakeup).
    """
    names = _destination_names(destinations)
    data, ds = part10_bytes(obj)
    ident = _identity(ds)
    now = as_utc(now)

    def work(session: Session) -> list[OutboxRow]:
        existing = {
            r.destination: r
            for r in session.exec(
                select(OutboxRow).where(
                    OutboxRow.sop_instance_uid == ident.sop_instance_uid, col(OutboxRow.destination).in_(names)
                )
            )
        }
        missing = [n for n in names if n not in existing]
        if missing:
            stored = storage.write(data)  # durable before the row that points at it exists
            values = [
                {
                    "created_at": now,
                    "updated_at": now,
                    "relpath": stored.relpath,
                    "sha256": stored.sha256,
                    "size": stored.size,
                    "sop_instance_uid": ident.sop_instance_uid,
                    "sop_class_uid": ident.sop_class_uid,
                    "transfer_syntax_uid": ident.transfer_syntax_uid,
                    "study_instance_uid": ident.study_instance_uid,
                    "series_instance_uid": ident.series_instance_uid,
                    "destination": n,
                    "state": PENDING,
                    "attempts": 0,
                    "next_attempt_at": as_utc(not_before) if not_before else now,
                    "warnings": 0,
                    "job_id": job_id,
                    "fallback_of": fallback_of,
                }
                for n in missing
            ]
            _insert_ignoring_duplicates(session, values)
            session.flush()
            notify(session, missing)  # the exporter wakes when this transaction commits
        if existing:
            digest = hashlib.sha256(data).hexdigest()
            for r in existing.values():
                if r.sha256 != digest:
                    # Same SOP Instance UID, different bytes: a writer bug. Keep the first version.
                    log.warning("outbox: row %s already holds a different object with the same SOP Instance UID", r.id)
        rows = list(
            session.exec(
                select(OutboxRow)
                .where(OutboxRow.sop_instance_uid == ident.sop_instance_uid, col(OutboxRow.destination).in_(names))
                .order_by(col(OutboxRow.id))
            )
        )
        return rows

    if isinstance(db, Session):
        return work(db)
    with Session(db, expire_on_commit=False) as session:
        rows = work(session)
        session.commit()
        return rows


# --------------------------------------------------------------------------------------------- claim / lease


def claim_due(
    engine: Engine, destination: str, now: datetime, *, limit: int, lease_seconds: float
) -> tuple[str, list[OutboxRow]]:
    """Atomically move up to `limit` due pending rows of `destination` to "sending" under a new token."""
    with Session(engine, expire_on_commit=False) as session:
        due = (
            select(OutboxRow.id)
            .where(OutboxRow.state == PENDING, OutboxRow.destination == destination, OutboxRow.next_attempt_at <= now)
            .order_by(col(OutboxRow.next_attempt_at), col(OutboxRow.id))
            .limit(limit)
        )
        if engine.dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        token, _ = leases.claim(
            session,
            OutboxRow,
            [col(OutboxRow.id).in_(due.scalar_subquery()), OutboxRow.state == PENDING],
            now=now,
            lease_seconds=lease_seconds,
            state=SENDING,
            claimed_at=now,
            updated_at=now,
        )
        session.commit()
        rows = list(session.exec(select(OutboxRow).where(leases.held(OutboxRow, token)).order_by(col(OutboxRow.id))))
    return token, rows


def recover_expired(engine: Engine, now: datetime) -> int:
    """Rows left "sending" past their lease (exporter crashed or was killed) go back to "pending".

    The send may or may not have reached the destination; sending again is safe because the
    SOP Instance UID is the same (the PACS overwrites or ignores it).
    """
    with Session(engine) as session:
        result = session.execute(
            update(OutboxRow)
            .where(OutboxRow.state == SENDING, leases.expired(OutboxRow, now))
            .values(state=PENDING, **leases.CLEARED, next_attempt_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        n = result.rowcount or 0  # type: ignore[attr-defined]
    if n:
        log.warning("outbox: recovered %d row(s) left 'sending' by an exporter that stopped mid-send", n)
    return n


def fail_unconfigured(engine: Engine, configured: Sequence[str], now: datetime) -> int:
    """Pending rows whose destination is no longer configured end failed (retry re-queues them)."""
    with Session(engine) as session:
        stmt = (
            update(OutboxRow)
            .where(OutboxRow.state == PENDING, col(OutboxRow.destination).not_in(list(configured)))
            .values(
                state=FAILED,
                updated_at=now,
                last_error="destination is not in the configuration ([[destinations]] name)",
            )
            .execution_options(synchronize_session=False)
        )
        n = session.execute(stmt).rowcount or 0  # type: ignore[attr-defined]
        session.commit()
    return n


@dataclass
class RowUpdate:
    """The outcome of one send, to be written to its (still claimed) row."""

    row_id: int
    values: dict[str, Any]


def apply_updates(engine: Engine, token: str, updates: Sequence[RowUpdate]) -> None:
    """Write outcomes in one transaction; only rows still held under `token` are touched."""
    if not updates:
        return
    with Session(engine) as session:
        for u in updates:
            session.execute(
                update(OutboxRow)
                .where(OutboxRow.id == u.row_id, leases.held(OutboxRow, token))
                .values(**u.values)
                .execution_options(synchronize_session=False)
            )
        session.commit()


def renew_lease(engine: Engine, token: str, now: datetime, lease_seconds: float) -> int:
    """Extend the lease of the rows still held under `token` (the exporter is alive and sending)."""
    return leases.renew(engine, OutboxRow, token, now=now, lease_seconds=lease_seconds)


def release_claim(engine: Engine, token: str, now: datetime) -> int:
    """Rows still held under `token` (never reported on) go back to "pending", attempts unchanged."""
    return leases.release(engine, OutboxRow, token, state=PENDING, updated_at=now)


# --------------------------------------------------------------------------------------------- operator actions


def requeue(
    engine: Engine,
    *,
    ids: Sequence[int] = (),
    all_failed: bool = False,
    destination: str | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Failed rows back to "pending", due now, attempts reset. Returns the ids re-queued.

    `ids` selects rows (only failed ones move); `all_failed` takes every failed row; `destination`
    narrows either selection. Done rows are left alone: the destination already confirmed them.
    """
    if not ids and not all_failed:
        raise ValueError("give row ids or all_failed=True")
    now = as_utc(now)
    with Session(engine) as session:
        query = select(OutboxRow.id).where(OutboxRow.state == FAILED)
        if ids:
            query = query.where(col(OutboxRow.id).in_(list(ids)))
        if destination:
            query = query.where(OutboxRow.destination == destination)
        chosen = list(session.exec(query))
        if chosen:
            session.execute(
                update(OutboxRow)
                .where(col(OutboxRow.id).in_(chosen), OutboxRow.state == FAILED)
                .values(state=PENDING, attempts=0, next_attempt_at=now, updated_at=now, claim_token=None)
                .execution_options(synchronize_session=False)
            )
            notify(session, [destination or ALL])
            session.commit()
    if chosen:
        log.info("outbox: re-queued %d failed row(s)", len(chosen))
    return sorted(chosen)


@dataclass
class DestinationSummary:
    destination: str
    counts: dict[str, int]
    last_errors: list[tuple[int, str | None, int | None, str | None]]  # (id, sop class, status, error) of failed rows

    @property
    def failed(self) -> int:
        return self.counts.get(FAILED, 0)


def summary(engine: Engine, *, last_errors: int = 5) -> list[DestinationSummary]:
    """Counts per destination and state, plus the latest failed rows' errors."""
    with Session(engine) as session:
        counts: dict[str, dict[str, int]] = {}
        for dest, state, n in session.exec(
            select(OutboxRow.destination, OutboxRow.state, func.count()).group_by(
                OutboxRow.destination, OutboxRow.state
            )
        ):
            counts.setdefault(dest, {s: 0 for s in (PENDING, SENDING, DONE, FAILED, SUPERSEDED)})[state] = n
        out = []
        for dest in sorted(counts):
            failed = session.exec(
                select(OutboxRow)
                .where(OutboxRow.destination == dest, OutboxRow.state == FAILED)
                .order_by(col(OutboxRow.updated_at).desc(), col(OutboxRow.id).desc())
                .limit(last_errors)
            ).all()
            out.append(
                DestinationSummary(
                    destination=dest,
                    counts=counts[dest],
                    last_errors=[(r.id or 0, r.sop_class_uid, r.last_status, r.last_error) for r in failed],
                )
            )
    return out


def rows(
    engine: Engine,
    *,
    limit: int = 100,
    offset: int = 0,
    state: str | None = None,
    destination: str | None = None,
) -> list[OutboxRow]:
    """Outbox rows, newest first, one page; optionally of one state and/or destination."""
    with Session(engine, expire_on_commit=False) as session:
        page = newest_page(OutboxRow, limit=limit, offset=offset, state=state, destination=destination)
        return list(session.exec(page))


def get_row(engine: Engine, row_id: int) -> OutboxRow | None:
    with Session(engine, expire_on_commit=False) as session:
        return session.get(OutboxRow, row_id)


__all__ = [
    "DONE",
    "EnqueueError",
    "FAILED",
    "PENDING",
    "SENDING",
    "SUPERSEDED",
    "claim_due",
    "enqueue",
    "recover_expired",
    "requeue",
    "summary",
]
