"""Receive one instance: check, parse the routing tags, store the bytes durably, index them.

`Ingest.receive_file()` is called from the C-STORE handler with the Part 10 file pynetdicom
wrote while the data set arrived (`STORE_RECV_CHUNKED_DATASET`: the bytes as received, never
decoded and re-encoded, never whole in memory). Order: size cap and free disk -> walk, hash,
parse tags from the file -> fdatasync, atomic rename into `objects/` -> group commit of the
index row (dicom_node/group_commit.py, after one directory fsync per batch) -> success. Every
refusal is a `Refused` with a DIMSE status (PS3.4 B.2.3), a short ErrorComment and a reason
recorded in the rejection log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from sqlalchemy import BigInteger, Integer, and_, bindparam, false, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, UTCDateTime

from dicom_node.dataset_check import Incomplete, Walked, check_pixel_length, walk_elements
from dicom_node.group_commit import Created, GroupCommit
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
from dicom_node.storage import Storage, StorageFull

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
    .values(
        last_received_at=bindparam("p_now", type_=_TS),
        instance_count=REVISIONS.c.instance_count + bindparam("p_inc", type_=Integer()),
    )
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
_TAG_OF = {k: int(t) for k, t in zip(_TAGS, _SPECIFIC, strict=True)}
CHARSET_TAG = 0x00080005  # Specific Character Set: pydicom always reads it with specific_tags
# Plain ints: a set of pydicom BaseTags compares with a Python-level __eq__ on every lookup.
_COLLECT = frozenset([*_TAG_OF.values(), CHARSET_TAG])
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"


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
    # Where the time went in our handler (seconds): reading back, hashing and checking the file
    # pynetdicom wrote (write_s), the rest of its fdatasync (started beside the checks) and its
    # rename (fsync_s), and the wait for the group commit of its row, the batch's directory
    # fsync included (index_s).
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
    return parse_tags_from(BytesIO(preamble_and_meta + dataset))


def parse_tags_from(fp: BinaryIO) -> Tags:
    """Read only the routing tags from a Part 10 stream: pydicom seeks past every other value
    and stops before Pixel Data, so a file of any size costs a few reads."""
    try:
        ds = dcmread(fp, stop_before_pixels=True, specific_tags=_SPECIFIC)
    except Exception as exc:
        raise Refused(
            CANNOT_UNDERSTAND, "Data Set cannot be parsed", "unparsable", f"parse error: {type(exc).__name__}"
        ) from exc
    return _routing_tags(ds)


def _walked_dataset(
    data: bytes | memoryview, head_len: int, walked: Walked, transfer_syntax_uid: str
) -> Dataset | None:
    """The routing tags as the pydicom Dataset `dcmread(specific_tags=...)` would return, built
    from where `check_encoding`'s walk found them: the same raw elements and character set, so
    pydicom decodes every value exactly as before, without parsing the data set a second time.

    None when pydicom would read this data set differently from the walk (big endian, a first
    element whose VR field says the other VR encoding, an unknown explicit VR anywhere, a
    routing element with a sequence or undefined length): the caller then uses dcmread.
    """
    implicit = transfer_syntax_uid == IMPLICIT_VR_LE
    if transfer_syntax_uid not in (IMPLICIT_VR_LE, EXPLICIT_VR_LE) or walked.odd_vr:
        return None
    first_vr = bytes(data[head_len + 4 : head_len + 6])
    # pydicom's _is_implicit_vr: two capital letters after the first tag mean explicit VR.
    if len(first_vr) == 2 and (0x40 < first_vr[0] < 0x5B and 0x40 < first_vr[1] < 0x5B) == implicit:
        return None
    try:
        return _dataset_from(data, head_len, walked, implicit)
    except Exception as exc:  # the character set cannot be decoded: dcmread failed there too
        raise Refused(
            CANNOT_UNDERSTAND, "Data Set cannot be parsed", "unparsable", f"parse error: {type(exc).__name__}"
        ) from exc


def _dataset_from(data: bytes | memoryview, head_len: int, walked: Walked, implicit: bool) -> Dataset | None:
    raw: dict[BaseTag, RawDataElement] = {}
    for tag, (vr_bytes, length, at) in walked.found.items():
        vr = None if vr_bytes is None else vr_bytes.decode("ascii")
        if vr == "SQ" or length == 0xFFFFFFFF:
            return None
        value = bytes(data[head_len + at : head_len + at + length]) if length else empty_value_for_VR(vr, raw=True)
        raw[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, value, head_len + at, implicit, True)
    ds = Dataset(raw, parent_encoding=default_encoding)
    encoding: str | list[str] = default_encoding
    if CHARSET_TAG in raw:
        encoding = convert_encodings(convert_raw_data_element(raw[CHARSET_TAG]).value)
    ds.set_original_encoding(implicit, True, encoding)
    return ds


def _routing_tags(ds: Dataset) -> Tags:
    """Tags from a Dataset holding (at least) the routing elements; Refused as the checks say."""
    try:
        # Each present element decoded once, now (lazy decoding errors surface here), by tag:
        # looking values up by keyword again and again cost more than decoding them.
        values = {k: ds[t].value for k, t in _TAG_OF.items() if t in ds}
    except Exception as exc:
        raise Refused(
            CANNOT_UNDERSTAND, "Data Set cannot be parsed", "unparsable", f"parse error: {type(exc).__name__}"
        ) from exc

    def text(keyword: str) -> str | None:
        try:
            return clean_text(values.get(keyword))
        except Exception:
            return None

    def number(keyword: str) -> int | None:
        return _int(values[keyword]) if keyword in values else None

    return Tags(
        sop_class_uid=_uid(values, "SOPClassUID"),
        sop_instance_uid=_uid(values, "SOPInstanceUID"),
        study_instance_uid=_uid(values, "StudyInstanceUID"),
        series_instance_uid=_uid(values, "SeriesInstanceUID"),
        patient_id=text("PatientID") or "",
        patient_name=text("PatientName"),
        accession_number=text("AccessionNumber"),
        study_date=text("StudyDate"),
        study_description=text("StudyDescription"),
        modality=text("Modality"),
        body_part_examined=text("BodyPartExamined"),
        series_description=text("SeriesDescription"),
        series_number=number("SeriesNumber"),
        instance_number=number("InstanceNumber"),
        rows=number("Rows"),
        columns=number("Columns"),
        samples_per_pixel=number("SamplesPerPixel"),
        bits_allocated=number("BitsAllocated"),
        number_of_frames=number("NumberOfFrames"),
        images_in_acquisition=_count(values),
        acquisition_number=number("AcquisitionNumber"),
    )


def _count(values: dict[str, Any]) -> int | None:
    """ImagesInAcquisition (0020,1002) when it is a positive integer, else None. Not for a
    multi-frame instance: there it may count frames, not instances."""
    if "ImagesInAcquisition" not in values:
        return None
    if "NumberOfFrames" in values and (_int(values["NumberOfFrames"]) or 1) > 1:
        return None
    n = _int(values["ImagesInAcquisition"])
    return n if n is not None and n >= 1 else None


def check_encoding(
    dataset: bytes | memoryview, transfer_syntax_uid: str, collect: Collection[int] = ()
) -> Walked | None:
    """0xC000 unless the encoding reaches its end (no truncated element, no missing delimiter).

    Runs before the tags are read: a cut-off data set is reported as such, not as a missing UID.
    See dicom_node/dataset_check.py.
    """
    try:
        return walk_elements(dataset, transfer_syntax_uid, collect)
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


SYNC_THREADS = 16  # fdatasyncs of received files in flight at once (one per association at most)

# Up to this size a received file is read into memory once (one read, hashed and walked there);
# larger ones are hashed in chunks and walked through a read-only map (only headers are touched).
IN_MEMORY_MAX = 8 * 1024 * 1024


@dataclass(frozen=True)
class Checked:
    tags: Tags
    sha256: str


@dataclass(frozen=True)
class _IndexItem:
    tags: Tags
    relpath: str
    sha256: str
    size: int
    transfer_syntax_uid: str
    peer: Peer


@dataclass(frozen=True)
class _Touch:
    """The count and time updates one indexed instance owes its revision, series and study row.

    Applied once per batch for all its instances (`Ingest._complete`): the same sums and last
    values as one UPDATE per instance, in a few statements. Fewer statements matter more than
    their SQL: each one hands the GIL back and waits for it again, which costs most when many
    associations' threads compete for it."""

    study_pk: int
    revision: int
    touch_revision: bool  # False: this instance inserted the revision row (count 1 already)
    series_pk: int
    inc_series: int
    inc_study: int
    expected: int | None
    acquisition: int | None
    now: datetime


def check_file(path: Path, size: int, transfer_syntax_uid: str) -> Checked:
    """The checks of a received or found Part 10 file, in their order: the encoding reaches its
    end (0xC000), the routing tags parse and their UIDs are valid (0xC000/0xC001/0xC002), the
    pixels match the SOP class and attributes (0xA900); with its sha256. Memory stays bounded."""
    with open(path, "rb") as fh:
        if size <= IN_MEMORY_MAX:
            data = fh.read()
            head_len = _part10_head_length(data)
            sha = hashlib.sha256(data).hexdigest()
            walked = check_encoding(memoryview(data)[head_len:], transfer_syntax_uid, _COLLECT)
            ds = _walked_dataset(data, head_len, walked, transfer_syntax_uid) if walked is not None else None
            tags = parse_tags_from(BytesIO(data)) if ds is None else _routing_tags(ds)
        else:
            head_len = _part10_head_length(fh.read(144))
            fh.seek(0)
            sha = hashlib.file_digest(fh, "sha256").hexdigest()  # chunked, GIL released
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                walked = check_encoding(memoryview(mapped)[head_len:], transfer_syntax_uid)
            finally:
                with contextlib.suppress(BufferError):  # a traceback still holds a view: GC closes it
                    mapped.close()
            fh.seek(0)
            tags = parse_tags_from(fh)
    check_pixels(walked, transfer_syntax_uid, tags)
    return Checked(tags, sha)


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
    """Stores and indexes received instances; thread-safe. Index rows commit in groups
    (dicom_node/group_commit.py): one transaction for the instances of every association that
    arrived while the previous one committed."""

    def __init__(
        self,
        engine: Engine,
        storage: Storage,
        *,
        max_instance_bytes: int,
        duplicate_policy: str = "keep_first",
        log_phi: bool = False,
        commit_window_s: float = 0.0,
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
        # lock frees: queueing the index transactions of every listener process hands the database
        # over at once. Other writers (completion monitor, CLI) still meet busy_timeout.
        write_lock: _SQLiteWriterQueue | contextlib.nullcontext[None] = (
            _SQLiteWriterQueue(engine.url.database) if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )
        self.committer = GroupCommit(
            engine,
            self._apply,
            lock=write_lock,
            on_commit=self._remember_ids,
            complete=self._complete,
            window_s=commit_window_s,
        )
        # fdatasync of a received file runs here, beside its checks (both mostly outside the GIL).
        self._syncer = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="storage-sync")

    def close(self) -> None:
        """Stop the committer thread (after the listener stopped)."""
        self.committer.close()
        self._syncer.shutdown(wait=False)

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
        """`head` = preamble + 'DICM' + encoded file meta, `dataset` = the data set as received.

        For callers holding the bytes (tests, tools): written to the storage's temp folder,
        then `receive_file`.
        """
        tmp = self.storage.tmp_dir / f"{uuid.uuid4().hex}.rcv"
        try:
            with open(tmp, "wb") as fh:
                fh.write(head)
                fh.write(dataset)
            return self.receive_file(
                tmp,
                peer,
                transfer_syntax_uid=transfer_syntax_uid,
                affected_sop_class_uid=affected_sop_class_uid,
                affected_sop_instance_uid=affected_sop_instance_uid,
            )
        finally:
            tmp.unlink(missing_ok=True)

    def receive_file(
        self,
        path: Path,
        peer: Peer,
        *,
        transfer_syntax_uid: str,
        affected_sop_class_uid: str | None = None,
        affected_sop_instance_uid: str | None = None,
    ) -> Outcome:
        """Check, store and index a received Part 10 file (pynetdicom's chunked receive writes it).

        Order: size cap and free disk -> walk the encoding, hash, read the routing tags (from the
        file: memory stays bounded for any size) -> fdatasync the file and rename it into
        `objects/` (the file moves: on success the path no longer exists) -> group commit of the
        index row, after one fsync of the object's directory per batch -> success.
        """
        t0 = time.perf_counter()
        size = os.stat(path).st_size
        if size > self.max_instance_bytes:
            raise Refused(
                OUT_OF_RESOURCES,
                "Instance larger than max_instance_bytes",
                "too_large",
                f"{size} B > max_instance_bytes {self.max_instance_bytes} B",
            )
        try:
            self.storage.check_free(0)
        except StorageFull as exc:
            raise Refused(OUT_OF_RESOURCES, "Storage below min_free_bytes", "disk_full", str(exc)) from exc
        synced = self._syncer.submit(self.storage.sync_file, path)
        try:
            checked = check_file(path, size, transfer_syntax_uid)
            tags = checked.tags
            if affected_sop_class_uid and tags.sop_class_uid != str(affected_sop_class_uid):
                raise Refused(DATASET_MISMATCH, "SOPClassUID differs from the request", "sop_class_mismatch")
            if affected_sop_instance_uid and tags.sop_instance_uid != str(affected_sop_instance_uid):
                raise Refused(DATASET_MISMATCH, "SOPInstanceUID differs from the request", "sop_instance_mismatch")
        except BaseException:
            synced.cancel()
            raise
        t1 = time.perf_counter()
        relpath = self.storage.allocate()
        try:
            synced.result()
            placed = self.storage.place(path, relpath, synced=True)
        except StorageFull as exc:
            raise Refused(OUT_OF_RESOURCES, "Storage below min_free_bytes", "disk_full", str(exc)) from exc
        except OSError as exc:
            raise Refused(OUT_OF_RESOURCES, "Storage write failed", "storage_error", f"{type(exc).__name__}") from exc
        t2 = time.perf_counter()
        try:
            # Identical re-sends are recognised inside the index transaction (and their copy removed).
            outcome, drop_relpath = self.committer.submit(
                _IndexItem(tags, relpath, checked.sha256, size, transfer_syntax_uid, peer), placed
            )
        except BaseException:
            # Not acknowledged, so not kept: the sender will retry.
            self.storage.remove(relpath)
            raise
        t3 = time.perf_counter()
        if drop_relpath:
            self.storage.remove(drop_relpath)
        outcome = replace(
            outcome,
            write_s=t1 - t0,
            fsync_s=t2 - t1,
            index_s=t3 - t2,
            study_instance_uid=tags.study_instance_uid,
            series_instance_uid=tags.series_instance_uid,
        )
        fields: dict[str, Any] = {
            "instance": outcome.instance_pk,
            "action": outcome.action,
            "revision": outcome.revision,
            "bytes": size,
            "sha256": checked.sha256[:16],
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
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(144)
            head_len = _part10_head_length(head)
            fh.seek(0)
            try:
                meta = dcmread(BytesIO(fh.read(head_len)), stop_before_pixels=True).file_meta
                ts_uid = str(meta.TransferSyntaxUID)
            except Exception as exc:
                raise Refused(CANNOT_UNDERSTAND, "File Meta cannot be read", "unparsable", type(exc).__name__) from exc
        checked = check_file(path, size, ts_uid)
        outcome, drop = self.committer.submit(_IndexItem(checked.tags, relpath, checked.sha256, size, ts_uid, peer))
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

    def _apply(self, conn: Connection, created: Created, item: _IndexItem) -> tuple[Outcome, str | None, _Touch | None]:
        return self._index_tx(
            conn, created, item.tags, item.relpath, item.sha256, item.size, item.transfer_syntax_uid, item.peer
        )

    def _complete(
        self, conn: Connection, created: Created, results: list[tuple[Outcome, str | None, _Touch | None]]
    ) -> list[tuple[Outcome, str | None]]:
        """The batch's revision, series and study updates, one statement per row touched, and
        each instance's `count_reached` as if its own update had run after its insert."""
        touches = [(i, t) for i, (_, _, t) in enumerate(results) if t is not None]
        revisions: dict[tuple[int, int], list[_Touch]] = {}
        series: dict[int, list[tuple[int, _Touch]]] = {}
        studies: dict[int, list[_Touch]] = {}
        for i, t in touches:
            if t.touch_revision:
                revisions.setdefault((t.study_pk, t.revision), []).append(t)
            series.setdefault(t.series_pk, []).append((i, t))
            studies.setdefault(t.study_pk, []).append(t)
        for (study_pk, rev), ts in revisions.items():
            conn.execute(_TOUCH_REVISION, {"p_study": study_pk, "p_rev": rev, "p_now": ts[-1].now, "p_inc": len(ts)})
        reached: set[int] = set()
        for series_pk, its in series.items():
            if len({(t.expected, t.acquisition) for _, t in its}) == 1:
                groups = [its]  # one UPDATE: count_known ANDs the same condition for each
            else:
                groups = [[it] for it in its]  # rare (announced counts differ): one per instance
            for group in groups:
                last = group[-1][1]
                counts = conn.execute(
                    _TOUCH_SERIES,
                    {
                        "p_series": series_pk,
                        "p_now": last.now,
                        "p_inc": sum(t.inc_series for _, t in group),
                        "p_expected": last.expected,
                        "p_acq": last.acquisition,
                    },
                ).one()
                # The count each instance would have seen right after its own update.
                count = counts.instance_count
                for i, t in reversed(group):
                    if count in (counts.expected_instances if counts.count_known else None, counts.queried_instances):
                        reached.add(i)
                    count -= t.inc_series
        for study_pk, ts in studies.items():
            conn.execute(
                _TOUCH_STUDY,
                {
                    "p_study": study_pk,
                    "p_rev": ts[-1].revision,
                    "p_now": ts[-1].now,
                    "p_inc": sum(t.inc_study for t in ts),
                },
            )
        return [
            (replace(outcome, count_reached=True) if i in reached else outcome, drop)
            for i, (outcome, drop, _) in enumerate(results)
        ]

    def _remember_ids(self, created: dict[Any, Any]) -> None:
        # Cache ids only once committed: a rolled-back insert must not leave a dangling id.
        if len(self._ids) > 100_000:
            self._ids.clear()
        self._ids.update(created)

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
        pk = self._ids.get(cache_key) or created.get(cache_key)
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
        created: Created,
        tags: Tags,
        relpath: str,
        sha: str,
        size: int,
        ts_uid: str,
        peer: Peer,
    ) -> tuple[Outcome, str | None, _Touch | None]:
        """Index one instance inside the batch's transaction; the revision, series and study
        count updates it owes are returned (`_Touch`), applied for the whole batch by `_complete`."""
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
        # Once per transaction: later instances of the study in this batch hold the lock already
        # and know its revision from the instance before them (its study update is deferred).
        state_key = ("study", study_pk)
        if state_key in created.scratch:
            current, rev_state = created.scratch[state_key]
        else:
            current, rev_state = conn.execute(_LOCK_STUDY, {"p_study": study_pk}).one()
            created.scratch[state_key] = (current, rev_state)
        existing = conn.execute(_EXISTING, {"p_sop": tags.sop_instance_uid}).first()
        if existing is not None and (existing.sha256 == sha or self.duplicate_policy == "keep_first"):
            conn.execute(_COUNT_DUPLICATE, {"p_id": existing.id, "p_now": now})
            if existing.sha256 == sha:
                return Outcome(SUCCESS, existing.id, "duplicate_identical", current, size, sha), relpath, None
            # keep_first: the new bytes stay on disk (received_relpath) so nothing sent to us is lost.
            conn.execute(
                insert(DUPLICATES).values(
                    **self._duplicate_event(existing, tags, relpath, sha, size, peer, KEPT_FIRST, now)
                )
            )
            return Outcome(SUCCESS, existing.id, "duplicate_kept_first", current, size, sha), None, None

        # A new instance, or new bytes replacing old ones: new content for the study.
        revision = current
        new_revision = rev_state is None or rev_state == COMPLETE
        if new_revision:
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
            created.scratch[state_key] = (revision, RECEIVING)
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
        touch = _Touch(
            study_pk=study_pk,
            revision=revision,
            touch_revision=not new_revision,
            series_pk=series_pk,
            inc_series=1 if added_to_series else 0,
            inc_study=1 if added_to_study else 0,
            expected=tags.images_in_acquisition,
            acquisition=tags.acquisition_number,
            now=now,
        )
        return Outcome(SUCCESS, instance_pk, action, revision, size, sha), None, touch

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
