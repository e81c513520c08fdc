"""Receive one instance: check, parse the routing tags, store the bytes durably, index them.

`Ingest.receive()` is called from the C-STORE handler with the raw bytes as received (never a
decoded and re-encoded dataset). Order: size cap and free disk -> parse tags -> write temp,
fsync, atomic rename -> commit the index row -> success. Every refusal is a `Refused` with a
DIMSE status, a short ErrorComment and a reason recorded in the rejection log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.tag import Tag
from sqlalchemy import BigInteger, Integer, and_, bindparam, false, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, UTCDateTime

from dicom_node.dataset_check import Incomplete, Walked, check_pixel_length, walk_elements
from dicom_node.logs import kv
from dicom_node.models import (
    COMPLETE,
    KEPT_FIRST,
    RECEIVING,
    REPLACED,
    DuplicateEvent,
    Instance,
    Patient,
    Rejection,
    Series,
    Study,
    StudyRevision,
)
from dicom_node.sop_classes import is_image_storage
from dicom_node.storage import Storage, StorageFull, StoredObject

log = logging.getLogger("dicom_node.ingest")

# Core tables: the hot path skips the ORM's per-statement overhead.
PATIENTS, STUDIES, REVISIONS, SERIES, INSTANCES, DUPLICATES = (
    m.__table__  # type: ignore[attr-defined]
    for m in (Patient, Study, StudyRevision, Series, Instance, DuplicateEvent)
)

# The per-instance statements, built once: constructing SQLAlchemy statements per call cost
# more than executing them (the compiled form is cached by the engine).
_TS = UTCDateTime()
_LOCK_STUDY = (
    select(STUDIES.c.current_revision, REVISIONS.c.state)
    .select_from(
        STUDIES.outerjoin(
            REVISIONS,
            and_(REVISIONS.c.study_pk == STUDIES.c.id, REVISIONS.c.revision == STUDIES.c.current_revision),
        )
    )
    .where(STUDIES.c.id == bindparam("p_study"))
    .with_for_update(of=STUDIES)
)
_EXISTING = select(
    INSTANCES.c.id, INSTANCES.c.sha256, INSTANCES.c.relpath, INSTANCES.c.series_pk, INSTANCES.c.study_pk
).where(INSTANCES.c.sop_instance_uid == bindparam("p_sop"))
_COUNT_DUPLICATE = (
    update(INSTANCES)
    .where(INSTANCES.c.id == bindparam("p_id"))
    .values(duplicate_count=INSTANCES.c.duplicate_count + 1, last_duplicate_at=bindparam("p_now", type_=_TS))
)
_TOUCH_REVISION = (
    update(REVISIONS)
    .where(REVISIONS.c.study_pk == bindparam("p_study"), REVISIONS.c.revision == bindparam("p_rev"))
    .values(last_received_at=bindparam("p_now", type_=_TS), instance_count=REVISIONS.c.instance_count + 1)
)
_INSERT_INSTANCE = insert(INSTANCES).returning(INSTANCES.c.id)
_TOUCH_SERIES = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("p_series"))
    .values(
        state=RECEIVING,
        completed_at=None,
        completion_reason=None,
        last_received_at=bindparam("p_now", type_=_TS),
        instance_count=SERIES.c.instance_count + bindparam("p_inc", type_=Integer()),
        # The count stays known only while every instance announces the same one (dicom_node/completion.py).
        count_known=func.coalesce(
            and_(
                SERIES.c.count_known,
                SERIES.c.expected_instances == bindparam("p_expected", type_=Integer()),
                SERIES.c.count_acquisition.is_not_distinct_from(bindparam("p_acq", type_=BigInteger())),
            ),
            false(),
        ),
    )
    # What the completion monitor counts with: Outcome.count_reached wakes it (dicom_node/scp.py).
    .returning(SERIES.c.instance_count, SERIES.c.expected_instances, SERIES.c.count_known, SERIES.c.queried_instances)
)
_TOUCH_STUDY = (
    update(STUDIES)
    .where(STUDIES.c.id == bindparam("p_study"))
    .values(
        current_revision=bindparam("p_rev", type_=Integer()),
        last_received_at=bindparam("p_now", type_=_TS),
        instance_count=STUDIES.c.instance_count + bindparam("p_inc", type_=Integer()),
    )
)

# Threads writing objects to disk; each spends most of its time in fsync (GIL released).
WRITER_THREADS = 16

# DIMSE C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
MISSING_UID = 0xC001
MALFORMED_UID = 0xC002
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122

# PS3.5 9.1: components are digits without a leading zero (a lone "0" is allowed).
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "NumberOfFrames",
    "ImagesInAcquisition",
    "AcquisitionNumber",
]
_SPECIFIC = [Tag(k) for k in _TAGS]


class Refused(Exception):
    """A C-STORE we refuse: the DIMSE status, an ErrorComment (<= 64 chars) and a reason code."""

    def __init__(self, status: int, comment: str, reason: str, detail: str | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]
        self.reason = reason
        self.detail = detail or comment


@dataclass(frozen=True)
class Peer:
    calling_ae: str
    called_ae: str
    remote_ip: str


@dataclass(frozen=True)
class Tags:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    series_number: int | None
    instance_number: int | None
    rows: int | None
    columns: int | None
    samples_per_pixel: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None
    images_in_acquisition: int | None = None  # (0020,1002), PS3.3 C.7.6.1; only values >= 1
    acquisition_number: int | None = None


@dataclass(frozen=True)
class Outcome:
    status: int
    instance_pk: int
    action: str  # stored | duplicate_identical | duplicate_kept_first | duplicate_replaced
    revision: int
    size: int
    sha256: str
    # Where the time went (seconds): bytes written, fsyncs (file, rename, directory), and the
    # index transaction including its wait for the write. Write and fsync overlap the parse.
    write_s: float = 0.0
    fsync_s: float = 0.0
    index_s: float = 0.0
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    count_reached: bool = False  # the series now holds exactly its announced number of instances


def clean_text(value: Any, limit: int = 10_000) -> str | None:
    """A received string safe for any DB: no NUL (PostgreSQL refuses it), valid UTF-8, bounded."""
    if value is None:
        return None
    s = str(value)
    if not s:
        return None
    s = s.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return s[:limit]


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}


def printable(value: Any, limit: int = 200) -> str:
    """A received value made safe for one log line: control characters (NUL, newline, ESC...)
    written as \\xNN escapes, bounded in length."""
    return str(value)[:limit].translate(_CONTROL)


def short_ae(value: Any) -> str:
    return (clean_text(value, 16) or "").strip()


def _int(value: Any) -> int | None:
    try:
        if value is None or value == "":
            return None
        n = int(value)
        return n if -(2**62) < n < 2**62 else None
    except (TypeError, ValueError, OverflowError):
        return None


def _uid(ds: Any, keyword: str, *, required: bool = True) -> str:
    try:
        raw = ds.get(keyword)
    except Exception as exc:  # pydicom raises lazily on malformed values
        raise Refused(MALFORMED_UID, f"{keyword} cannot be decoded", "malformed_uid") from exc
    value = "" if raw is None else str(raw).strip().rstrip("\x00")
    if not value:
        if required:
            raise Refused(MISSING_UID, f"{keyword} missing", "missing_uid")
        return ""
    if len(value) > 64 or not UID_RE.match(value):
        raise Refused(MALFORMED_UID, f"{keyword} is not a valid UID", "malformed_uid")
    return value


def parse_tags(preamble_and_meta: bytes, dataset: bytes) -> Tags:
    """Read only the routing tags (no pixel data) from the encoded bytes."""
    try:
        ds = dcmread(BytesIO(preamble_and_meta + dataset), stop_before_pixels=True, specific_tags=_SPECIFIC)
        present = {k for k in _TAGS if k in ds}
        _ = {k: ds.get(k) for k in present}  # decode now: lazy decoding errors surface here
    except Exception as exc:
        raise Refused(
            CANNOT_UNDERSTAND, "Data Set cannot be parsed", "unparsable", f"parse error: {type(exc).__name__}"
        ) from exc

    def text(keyword: str) -> str | None:
        try:
            return clean_text(ds.get(keyword))
        except Exception:
            return None

    return Tags(
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        patient_id=text("PatientID") or "",
        patient_name=text("PatientName"),
        accession_number=text("AccessionNumber"),
        study_date=text("StudyDate"),
        study_description=text("StudyDescription"),
        modality=text("Modality"),
        body_part_examined=text("BodyPartExamined"),
        series_description=text("SeriesDescription"),
        series_number=_int(ds.get("SeriesNumber")) if "SeriesNumber" in present else None,
        instance_number=_int(ds.get("InstanceNumber")) if "InstanceNumber" in present else None,
        rows=_int(ds.get("Rows")) if "Rows" in present else None,
        columns=_int(ds.get("Columns")) if "Columns" in present else None,
        samples_per_pixel=_int(ds.get("SamplesPerPixel")) if "SamplesPerPixel" in present else None,
        bits_allocated=_int(ds.get("BitsAllocated")) if "BitsAllocated" in present else None,
        number_of_frames=_int(ds.get("NumberOfFrames")) if "NumberOfFrames" in present else None,
        images_in_acquisition=_count(ds, present),
        acquisition_number=_int(ds.get("AcquisitionNumber")) if "AcquisitionNumber" in present else None,
    )


def _count(ds: Any, present: set[str]) -> int | None:
    """ImagesInAcquisition (0020,1002) when it is a positive integer, else None. Not for a
    multi-frame instance: there it may count frames, not instances."""
    if "ImagesInAcquisition" not in present:
        return None
    if "NumberOfFrames" in present and (_int(ds.get("NumberOfFrames")) or 1) > 1:
        return None
    n = _int(ds.get("ImagesInAcquisition"))
    return n if n is not None and n >= 1 else None


def check_encoding(dataset: bytes, transfer_syntax_uid: str) -> Walked | None:
    """0xC000 unless the encoding reaches its end (no truncated element, no missing delimiter).

    Runs before the tags are read: a cut-off data set is reported as such, not as a missing UID.
    See dicom_node/dataset_check.py.
    """
    try:
        return walk_elements(dataset, transfer_syntax_uid)
    except Incomplete as exc:
        raise Refused(CANNOT_UNDERSTAND, str(exc), "incomplete", str(exc)) from exc


def check_pixels(walked: Walked | None, transfer_syntax_uid: str, tags: Tags) -> None:
    """0xA900 when the data set cannot be what its SOP class says: an image without pixel data,
    native Pixel Data whose length differs from Rows x Columns x Samples x Bits x Frames."""
    if walked is None:
        return
    if is_image_storage(tags.sop_class_uid) and not walked.has_pixel_data:
        msg = "Image SOP Class without Pixel Data (truncated?)"
        raise Refused(DATASET_MISMATCH, msg, "incomplete", msg)
    try:
        check_pixel_length(
            walked.pixel,
            transfer_syntax_uid,
            rows=tags.rows,
            columns=tags.columns,
            samples=tags.samples_per_pixel,
            bits_allocated=tags.bits_allocated,
            frames=tags.number_of_frames,
        )
    except Incomplete as exc:
        raise Refused(DATASET_MISMATCH, str(exc), "pixel_length", str(exc)) from exc


def _part10_head_length(data: bytes) -> int:
    """Bytes of preamble + 'DICM' + File Meta group (PS3.10 7.1), from its group length element."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise Refused(CANNOT_UNDERSTAND, "Not a DICOM Part 10 file", "unparsable", "no DICM prefix / group length")
    return 144 + int.from_bytes(data[140:144], "little")


def _now() -> datetime:
    return datetime.now(UTC)


def _insert(engine: Engine) -> Callable[..., Any]:
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


class _SQLiteWriterQueue:
    """Blocking hand-over of the SQLite write lock: a threading.Lock within this process and an
    flock() on `<db>.writer-lock` across listener processes (the kernel wakes the next waiter)."""

    def __init__(self, database: str | None) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        if database and database != ":memory:" and not database.startswith("file:"):
            try:
                self._fd = os.open(f"{database}.writer-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:  # read-only folder: the threading.Lock alone still helps
                self._fd = -1

    def busy(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._fd >= 0:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError:
                pass  # best effort: SQLite's own locking keeps it correct

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
        self._lock.release()

    def __del__(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Ingest:
    """Stores and indexes received instances; thread-safe (one DB transaction per instance)."""

    def __init__(
        self,
        engine: Engine,
        storage: Storage,
        *,
        max_instance_bytes: int,
        duplicate_policy: str = "keep_first",
        log_phi: bool = False,
    ) -> None:
        self.engine = engine
        self.storage = storage
        self.max_instance_bytes = max_instance_bytes
        self.duplicate_policy = duplicate_policy
        self.log_phi = log_phi
        self._insert = _insert(engine)
        self._ids: dict[tuple[str, str], int] = {}
        # SQLite has one writer at a time, and a writer that finds the database locked sleeps in
        # SQLite's busy handler (1, 2, 5, 10 ... 100 ms back-off) instead of being woken when the
        # lock frees: with 8 associations that back-off, not the work, set the pace. Queueing the
        # index transactions (of this process's threads, and of every listener process) hands the
        # database over at once. Other writers (completion monitor, CLI) still meet busy_timeout.
        self._write_lock: _SQLiteWriterQueue | contextlib.nullcontext[None] = (
            _SQLiteWriterQueue(engine.url.database) if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )
        # Storage writes run here, beside the parse and the index statements of the same instance.
        self._writer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="storage-write")

    # ------------------------------------------------------------------ public

    def receive(
        self,
        head: bytes,
        dataset: bytes,
        peer: Peer,
        *,
        transfer_syntax_uid: str,
        affected_sop_class_uid: str | None = None,
        affected_sop_instance_uid: str | None = None,
    ) -> Outcome:
        """`head` = preamble + 'DICM' + encoded file meta, `dataset` = the data set as received."""
        size = len(head) + len(dataset)
        if size > self.max_instance_bytes:
            raise Refused(
                OUT_OF_RESOURCES,
                "Instance larger than max_instance_bytes",
                "too_large",
                f"{size} B > max_instance_bytes {self.max_instance_bytes} B",
            )
        try:
            self.storage.check_free(size)
        except StorageFull as exc:
            raise Refused(OUT_OF_RESOURCES, "Storage below min_free_bytes", "disk_full", str(exc)) from exc
        # The bytes go to disk (write + two fsyncs, GIL released) on a writer thread while this
        # thread parses the tags and prepares the index transaction; the commit waits for them.
        relpath = self.storage.allocate()
        pending = self._writer.submit(self.storage.write, (head, dataset), relpath=relpath)
        try:
            # Hash first: hashlib releases the GIL on large buffers, which lets the writer thread
            # start at once instead of waiting for the pure-Python parse to yield the GIL. (The
            # writer hashes the same bytes on the other core; the digests are compared below.)
            digest = hashlib.sha256(head)
            digest.update(dataset)
            sha = digest.hexdigest()
            walked = check_encoding(dataset, transfer_syntax_uid)
            tags = parse_tags(head, dataset)
            check_pixels(walked, transfer_syntax_uid, tags)
            if affected_sop_class_uid and tags.sop_class_uid != str(affected_sop_class_uid):
                raise Refused(DATASET_MISMATCH, "SOPClassUID differs from the request", "sop_class_mismatch")
            if affected_sop_instance_uid and tags.sop_instance_uid != str(affected_sop_instance_uid):
                raise Refused(DATASET_MISMATCH, "SOPInstanceUID differs from the request", "sop_instance_mismatch")
            # Identical re-sends are recognised inside the index transaction (and their copy removed):
            # a separate look-up first would cost every new instance an extra round trip.
            t_index = time.perf_counter()
            outcome, drop_relpath = self._index(tags, relpath, sha, size, transfer_syntax_uid, peer, pending)
            outcome = replace(
                outcome, study_instance_uid=tags.study_instance_uid, series_instance_uid=tags.series_instance_uid
            )
            if pending.done() and pending.exception() is None:
                stored = pending.result()
                outcome = replace(
                    outcome,
                    write_s=stored.write_s,
                    fsync_s=stored.fsync_s,
                    index_s=time.perf_counter() - t_index,
                )
        except BaseException:
            # Not acknowledged, so not kept: the sender will retry.
            self._discard(pending, relpath)
            raise
        if drop_relpath:
            self.storage.remove(drop_relpath)
        fields: dict[str, Any] = {
            "instance": outcome.instance_pk,
            "action": outcome.action,
            "revision": outcome.revision,
            "bytes": size,
            "sha256": sha[:16],
            "calling_ae": peer.calling_ae,
            "remote_ip": peer.remote_ip,
        }
        if self.log_phi:
            fields.update(sop_instance_uid=tags.sop_instance_uid, patient_id=tags.patient_id)
        level = logging.WARNING if outcome.action in ("duplicate_kept_first", "duplicate_replaced") else logging.DEBUG
        log.log(level, "instance received", extra=kv(**fields))
        return outcome

    def adopt(self, relpath: str, peer: Peer) -> Outcome:
        """Index an object already in storage (start-up reconciliation), after the same checks
        as a received one. Raises Refused (with the reason) if it is not a complete instance."""
        path = self.storage.path(relpath)
        data = path.read_bytes()
        head_len = _part10_head_length(data)
        head, dataset = data[:head_len], data[head_len:]
        try:
            ts_uid = str(dcmread(BytesIO(head), stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception as exc:
            raise Refused(CANNOT_UNDERSTAND, "File Meta cannot be read", "unparsable", type(exc).__name__) from exc
        walked = check_encoding(dataset, ts_uid)
        tags = parse_tags(head, dataset)
        check_pixels(walked, ts_uid, tags)
        sha = hashlib.sha256(data).hexdigest()
        done: Future[StoredObject] = Future()
        done.set_result(StoredObject(relpath=relpath, sha256=sha, size=len(data)))
        outcome, drop = self._index(tags, relpath, sha, len(data), ts_uid, peer, done)
        if drop:  # an identical copy is indexed already
            self.storage.remove(drop)
        return outcome

    def record_rejection(
        self,
        *,
        stage: str,
        reason: str,
        detail: str,
        status: int | None = None,
        peer: Peer | None = None,
        sop_class_uid: str | None = None,
    ) -> None:
        record_rejection(
            self.engine,
            stage=stage,
            reason=reason,
            detail=detail,
            status=status,
            peer=peer,
            sop_class_uid=sop_class_uid,
        )

    # ------------------------------------------------------------------ internals

    def _discard(self, pending: Future[StoredObject], relpath: str) -> None:
        """Wait for an unacknowledged write to end, then remove its object (if it got that far)."""
        try:
            pending.result()
        except BaseException:  # the write cleaned up after itself
            return
        self.storage.remove(relpath)

    @staticmethod
    def _stored(pending: Future[StoredObject], sha: str) -> StoredObject:
        """The finished write, as a Refused if it failed."""
        try:
            stored = pending.result()
        except StorageFull as exc:
            raise Refused(OUT_OF_RESOURCES, "Storage below min_free_bytes", "disk_full", str(exc)) from exc
        except OSError as exc:
            raise Refused(OUT_OF_RESOURCES, "Storage write failed", "storage_error", f"{type(exc).__name__}") from exc
        if stored.sha256 != sha:  # both hashed the same bytes: anything else is a bug or bad memory
            raise Refused(PROCESSING_FAILURE, "Stored bytes differ from received", "storage_error", "sha256 mismatch")
        return stored

    def _index(
        self,
        tags: Tags,
        relpath: str,
        sha: str,
        size: int,
        ts_uid: str,
        peer: Peer,
        pending: Future[StoredObject],
    ) -> tuple[Outcome, str | None]:
        if isinstance(self._write_lock, _SQLiteWriterQueue) and self._write_lock.busy():
            # Another association holds SQLite: wait for our bytes outside its queue, so the lock is
            # held only for work that cannot overlap.
            self._stored(pending, sha)
        for attempt in range(4):
            created: dict[tuple[str, str], int] = {}
            try:
                with self._write_lock, self.engine.begin() as conn:
                    result = self._index_tx(conn, created, tags, relpath, sha, size, ts_uid, peer)
                    # Durability order: the object (data + directory entry) is on disk before the
                    # row that points at it commits; the C-STORE is acknowledged after both.
                    self._stored(pending, sha)
            except (IntegrityError, OperationalError) as exc:
                # A concurrent writer inserted the same patient/study/series/instance first, or
                # PostgreSQL picked us as a deadlock victim: the retry sees its committed row.
                if attempt == 3:
                    raise
                log.info("index retry", extra=kv(attempt=attempt + 1, error=type(exc).__name__))
                continue
            # Cache ids only once committed: a rolled-back insert must not leave a dangling id.
            if len(self._ids) > 100_000:
                self._ids.clear()
            self._ids.update(created)
            return result
        raise AssertionError("unreachable")

    def _get_or_create(
        self,
        conn: Connection,
        created: dict[tuple[str, str], int],
        table: Any,
        key_col: str,
        key: str,
        values: dict[str, Any],
    ) -> int:
        """Primary key of the row with `key`, inserting it if absent (race-safe; cached per process).

        Patient, study and series rows are never deleted by the node, so a cached id stays valid.
        """
        cache_key = (table.name, key)
        pk = self._ids.get(cache_key)
        if pk is not None:
            return pk
        conn.execute(
            self._insert(table).values(**{key_col: key}, **values).on_conflict_do_nothing(index_elements=[key_col])
        )
        pk = conn.execute(select(table.c.id).where(table.c[key_col] == key)).scalar_one()
        created[cache_key] = pk
        return pk

    def _index_tx(
        self,
        conn: Connection,
        created: dict[tuple[str, str], int],
        tags: Tags,
        relpath: str,
        sha: str,
        size: int,
        ts_uid: str,
        peer: Peer,
    ) -> tuple[Outcome, str | None]:
        now = _now()
        patient_key = hashlib.sha256(tags.patient_id.encode("utf-8")).hexdigest()
        patient_pk = self._get_or_create(
            conn,
            created,
            PATIENTS,
            "patient_key",
            patient_key,
            {"patient_id": tags.patient_id, "patient_name": tags.patient_name, "created_at": now},
        )
        study_pk = self._get_or_create(
            conn,
            created,
            STUDIES,
            "study_instance_uid",
            tags.study_instance_uid,
            {
                "patient_pk": patient_pk,
                "accession_number": tags.accession_number,
                "study_date": tags.study_date,
                "study_description": tags.study_description,
                "current_revision": 1,
                "instance_count": 0,
                "created_at": now,
                "last_received_at": now,
            },
        )
        # Lock the study row: the completion monitor takes the same lock before closing a revision.
        current, rev_state = conn.execute(_LOCK_STUDY, {"p_study": study_pk}).one()
        existing = conn.execute(_EXISTING, {"p_sop": tags.sop_instance_uid}).first()
        if existing is not None and (existing.sha256 == sha or self.duplicate_policy == "keep_first"):
            conn.execute(_COUNT_DUPLICATE, {"p_id": existing.id, "p_now": now})
            if existing.sha256 == sha:
                return Outcome(SUCCESS, existing.id, "duplicate_identical", current, size, sha), relpath
            # keep_first: the new bytes stay on disk (received_relpath) so nothing sent to us is lost.
            conn.execute(
                insert(DUPLICATES).values(
                    **self._duplicate_event(existing, tags, relpath, sha, size, peer, KEPT_FIRST, now)
                )
            )
            return Outcome(SUCCESS, existing.id, "duplicate_kept_first", current, size, sha), None

        # A new instance, or new bytes replacing old ones: new content for the study.
        revision = current
        if rev_state is None or rev_state == COMPLETE:
            revision = current if rev_state is None else current + 1
            conn.execute(
                insert(REVISIONS).values(
                    study_pk=study_pk,
                    revision=revision,
                    state=RECEIVING,
                    first_received_at=now,
                    last_received_at=now,
                    instance_count=1,
                )
            )
        else:
            conn.execute(_TOUCH_REVISION, {"p_study": study_pk, "p_rev": revision, "p_now": now})
        series_pk = self._get_or_create(
            conn,
            created,
            SERIES,
            "series_instance_uid",
            tags.series_instance_uid,
            {
                "study_pk": study_pk,
                "modality": tags.modality,
                "body_part_examined": tags.body_part_examined,
                "series_description": tags.series_description,
                "series_number": tags.series_number,
                "state": RECEIVING,
                "first_received_at": now,
                "last_received_at": now,
                "instance_count": 0,
                "expected_instances": tags.images_in_acquisition,
                "count_acquisition": tags.acquisition_number,
                "count_known": tags.images_in_acquisition is not None,
            },
        )
        values: dict[str, Any] = {
            "sop_class_uid": tags.sop_class_uid,
            "series_pk": series_pk,
            "study_pk": study_pk,
            "revision": revision,
            "instance_number": tags.instance_number,
            "rows": tags.rows,
            "columns": tags.columns,
            "transfer_syntax_uid": str(ts_uid)[:64],
            "size": size,
            "sha256": sha,
            "relpath": relpath,
            "calling_ae": peer.calling_ae,
            "called_ae": peer.called_ae,
            "remote_ip": peer.remote_ip,
            "received_at": now,
        }
        if existing is None:
            instance_pk = conn.execute(
                _INSERT_INSTANCE, {"sop_instance_uid": tags.sop_instance_uid, "duplicate_count": 0, **values}
            ).scalar_one()
            action = "stored"
            added_to_series = added_to_study = True
        else:
            # replace: the old bytes stay on disk (previous_relpath).
            event = self._duplicate_event(existing, tags, relpath, sha, size, peer, REPLACED, now)
            conn.execute(insert(DUPLICATES).values(**event))
            conn.execute(
                update(INSTANCES)
                .where(INSTANCES.c.id == existing.id)
                .values(duplicate_count=INSTANCES.c.duplicate_count + 1, last_duplicate_at=now, **values)
            )
            instance_pk = existing.id
            action = "duplicate_replaced"
            added_to_series = existing.series_pk != series_pk
            added_to_study = existing.study_pk != study_pk
            if added_to_series:
                conn.execute(
                    update(SERIES)
                    .where(SERIES.c.id == existing.series_pk)
                    .values(instance_count=SERIES.c.instance_count - 1)
                )
            if added_to_study:
                conn.execute(
                    update(STUDIES)
                    .where(STUDIES.c.id == existing.study_pk)
                    .values(instance_count=STUDIES.c.instance_count - 1)
                )
        counts = conn.execute(
            _TOUCH_SERIES,
            {
                "p_series": series_pk,
                "p_now": now,
                "p_inc": 1 if added_to_series else 0,
                "p_expected": tags.images_in_acquisition,
                "p_acq": tags.acquisition_number,
            },
        ).one()
        reached = counts.instance_count in (
            counts.expected_instances if counts.count_known else None,
            counts.queried_instances,
        )
        conn.execute(
            _TOUCH_STUDY,
            {"p_study": study_pk, "p_rev": revision, "p_now": now, "p_inc": 1 if added_to_study else 0},
        )
        return Outcome(SUCCESS, instance_pk, action, revision, size, sha, count_reached=reached), None

    def _duplicate_event(
        self,
        existing: Any,
        tags: Tags,
        received_relpath: str,
        sha: str,
        size: int,
        peer: Peer,
        action: str,
        now: datetime,
    ) -> dict[str, Any]:
        return {
            "at": now,
            "instance_pk": existing.id,
            "sop_instance_uid": tags.sop_instance_uid,
            "policy": self.duplicate_policy,
            "action": action,
            "previous_sha256": existing.sha256,
            "previous_relpath": existing.relpath,
            "received_sha256": sha,
            "received_relpath": received_relpath,
            "received_size": size,
            "calling_ae": peer.calling_ae,
            "remote_ip": peer.remote_ip,
        }


def record_rejection(
    engine: Engine,
    *,
    stage: str,
    reason: str,
    detail: str,
    status: int | None = None,
    peer: Peer | None = None,
    sop_class_uid: str | None = None,
) -> None:
    """Append to the rejection log; never raises (a failed log write must not crash the listener)."""
    try:
        with Session(engine) as s:
            s.add(
                Rejection(
                    at=_now(),
                    stage=stage,
                    reason=reason[:32],
                    detail=clean_text(detail, 2000) or "",
                    status=status,
                    calling_ae=short_ae(peer.calling_ae) if peer else None,
                    called_ae=short_ae(peer.called_ae) if peer else None,
                    remote_ip=(peer.remote_ip[:64] if peer else None),
                    sop_class_uid=(clean_text(sop_class_uid, 64) if sop_class_uid else None),
                )
            )
            s.commit()
    except Exception:
        log.exception("cannot record rejection", extra=kv(stage=stage, reason=reason))
    log.warning(
        "rejected",
        extra=kv(
            stage=stage,
            reason=reason,
            status=f"0x{status:04X}" if status is not None else "-",
            detail=printable(detail),
            calling_ae=printable(peer.calling_ae) if peer else "-",
            remote_ip=printable(peer.remote_ip) if peer else "-",
        ),
    )


def study_counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as s:
        n_inst, n_bytes = s.execute(select(func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))).one()
        return {"instances": int(n_inst), "bytes": int(n_bytes)}


__all__: Sequence[str] = ["Ingest", "Outcome", "Peer", "Refused", "Tags", "parse_tags", "record_rejection"]
