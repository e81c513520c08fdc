"""What one send attempt came to, and how a DICOM status maps onto it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS


class Kind(StrEnum):
    OK = "ok"  # stored (0x0000)
    WARNING = "warning"  # stored with a warning (0xB000, 0xB006, 0xB007, ...): delivered, counted
    RETRY = "retry"  # transient: connection, timeout, out of resources -> backoff and try again
    FAIL = "fail"  # permanent for this object: retrying the same bytes cannot succeed
    REFUSED = "refused"  # destination does not take this SOP class (no presentation context / 0x0122)
    SKIPPED = "skipped"  # never attempted (association dropped before its turn): no attempt counted


@dataclass(frozen=True)
class SendItem:
    """One claimed outbox row, as a sender sees it."""

    row_id: int
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str | None = None  # as recorded at enqueue; checked before sending
    size: int | None = None

    def read_verified(self) -> bytes:
        """The stored bytes, after checking they are still what was queued (never send a damaged file)."""
        data = self.path.read_bytes()
        if self.size is not None and len(data) != self.size:
            raise StoredObjectDamaged(f"stored object has {len(data)} bytes, {self.size} were queued")
        if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256:
            raise StoredObjectDamaged("stored object does not match its sha256 recorded at enqueue")
        return data


class StoredObjectDamaged(ValueError):
    """The file in storage changed since it was queued (disk error, tampering)."""


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    status: int | None = None  # DICOM status or HTTP code
    message: str | None = None
    sent_syntax: str | None = None  # the transfer syntax actually sent (differs after fallback)

    @property
    def delivered(self) -> bool:
        return self.kind in (Kind.OK, Kind.WARNING)


# Statuses that say "the PACS already has / keeps this instance": the object is there.
_DELIVERED_FAILURES = {0x0111}  # Duplicate SOP Instance (some archives answer it to a re-send)
_TRANSIENT = {0x0110, 0x0213, 0x0210}  # Processing Failure, Resource Limitation, Duplicate Invocation


def describe_status(code: int) -> str:
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
    if code == 0x0000:
        meaning = "Success"
    return f"0x{code:04X}" + (f" {meaning}" if meaning else "")


def classify_status(code: int, *, what: str = "C-STORE") -> Outcome:
    """Map a C-STORE (or STOW-RS FailureReason / WarningReason) status onto an outcome."""
    text = describe_status(code)
    if code == 0x0000:
        return Outcome(Kind.OK, code)
    if code in _DELIVERED_FAILURES:
        return Outcome(Kind.WARNING, code, f"{what} answered {text}: the destination already holds this instance")
    if 0xB000 <= code <= 0xBFFF or code in (0x0001, 0x0107, 0x0116):
        return Outcome(Kind.WARNING, code, f"{what} warning {text}")
    if 0xA700 <= code <= 0xA7FF or code in _TRANSIENT:
        return Outcome(Kind.RETRY, code, f"{what} failed: {text}")
    if code == 0x0122:
        return Outcome(Kind.REFUSED, code, f"{what} failed: {text}")
    if code == 0xFE00:
        return Outcome(Kind.RETRY, code, f"{what} cancelled by the destination (0xFE00)")
    return Outcome(Kind.FAIL, code, f"{what} failed: {text}")
