"""Modality Performed Procedure Step SCP (PS3.4 Annex F): N-CREATE and N-SET, stored durably.

A modality creates its step IN PROGRESS (N-CREATE) and ends it with an N-SET to COMPLETED or
DISCONTINUED, listing the series and instances it produced (Performed Series Sequence ->
Referenced Image Sequence / Referenced Non-Image Composite SOP Instance Sequence). The step, the
studies it names (every item of the Scheduled Step Attributes Sequence: one step may perform
requested procedures of several studies, PS3.4 F.7.2 Table F.7.2-1 and the group case of F.8)
and its references are rows (`Mpps`, `MppsStudy`, `MppsReference`); the completion monitor
(dicom_node/completion.py) holds each named study while the step is IN PROGRESS and completes
the listed series, whatever their study, once every listed instance has arrived.

Statuses (PS3.4 F.7.2.1.2, F.7.2.2.2; PS3.7 C.4):
- N-CREATE of a known SOP Instance UID: 0x0111 Duplicate SOP Instance;
- N-CREATE whose Performed Procedure Step Status (0040,0252) is not IN PROGRESS: 0x0106 Invalid
  Attribute Value (missing: 0x0120 Missing Attribute);
- N-SET of an unknown SOP Instance UID: 0x0112 No Such SOP Instance;
- N-SET of a step already COMPLETED or DISCONTINUED: 0x0110, which PS3.4 Table F.7.2-2 names
  "Performed Procedure Step Object may no longer be updated";
- a status value other than IN PROGRESS / COMPLETED / DISCONTINUED, or a malformed UID: 0x0106;
- an attribute list that cannot be decoded: 0x0110 Processing Failure.
Each refusal carries its sentence as the response's Error Comment (pynetdicom copies a status
Dataset's elements onto the N-CREATE/N-SET-RSP), is a rejection-log row (stage "mpps") with
that sentence, and a log line without patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from dicom_node.ingest import UID_RE, Peer, printable, record_rejection
from dicom_node.logs import kv
from dicom_node.models import (
    MPPS_COMPLETED,
    MPPS_DISCONTINUED,
    MPPS_FINAL,
    MPPS_IN_PROGRESS,
    Mpps,
    MppsReference,
    MppsStudy,
)
from sr_writers.uids import new_uid

log = logging.getLogger("dicom_node.mpps")

SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110  # for an N-SET of a final step: "may no longer be updated"
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120

STATES = (MPPS_IN_PROGRESS, MPPS_COMPLETED, MPPS_DISCONTINUED)

REFS = MppsReference.__table__  # type: ignore[attr-defined]
STEPS = Mpps.__table__  # type: ignore[attr-defined]
STUDIES = MppsStudy.__table__  # type: ignore[attr-defined]


class MppsRefused(Exception):
    """An N-CREATE/N-SET we refuse: the DIMSE status, a reason code and a sentence."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Reference:
    series_instance_uid: str
    sop_instance_uid: str


def _uid(value: Any, what: str) -> str:
    uid = ("" if value is None else str(value)).strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not UID_RE.match(uid):
        raise MppsRefused(INVALID_ATTRIBUTE_VALUE, "mpps_bad_uid", f"{what} is not a valid UID")
    return uid


def _state(ds: Dataset, *, required: bool) -> str | None:
    if "PerformedProcedureStepStatus" not in ds:
        if required:
            raise MppsRefused(
                MISSING_ATTRIBUTE, "mpps_missing_status", "Performed Procedure Step Status (0040,0252) missing"
            )
        return None
    value = str(ds.PerformedProcedureStepStatus or "").strip()
    if value not in STATES:
        raise MppsRefused(
            INVALID_ATTRIBUTE_VALUE,
            "mpps_bad_status",
            f"Performed Procedure Step Status {printable(value, 20)!r} is not one of {', '.join(STATES)}",
        )
    return value


def _references(ds: Dataset) -> list[Reference] | None:
    """The instances of Performed Series Sequence (0040,0340), or None when it is absent."""
    if "PerformedSeriesSequence" not in ds:
        return None
    refs: dict[str, Reference] = {}
    for series in ds.PerformedSeriesSequence or []:
        series_uid = _uid(series.get("SeriesInstanceUID"), "Series Instance UID of Performed Series Sequence")
        for keyword in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in series.get(keyword) or []:
                sop = _uid(item.get("ReferencedSOPInstanceUID"), f"Referenced SOP Instance UID of {keyword}")
                refs[sop] = Reference(series_uid, sop)
    return list(refs.values())


def _study_uids(ds: Dataset) -> list[str]:
    """The distinct Study Instance UIDs of the Scheduled Step Attributes Sequence, in order."""
    uids: dict[str, None] = {}
    for item in ds.get("ScheduledStepAttributesSequence") or []:
        if item.get("StudyInstanceUID"):
            uids[_uid(item.StudyInstanceUID, "Study Instance UID of Scheduled Step Attributes Sequence")] = None
    return list(uids)


class MppsStore:
    """The SCP's state: N-CREATE / N-SET against the `mpps` tables, each one transaction."""

    def __init__(self, engine: Engine, on_final: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.on_final = on_final  # e.g. CompletionMonitor.wake, when it runs in this process

    def create(self, sop_instance_uid: str | None, ds: Dataset, peer: Peer) -> str:
        """N-CREATE: a new step IN PROGRESS; returns its SOP Instance UID (ours if none was given)."""
        uid = _uid(sop_instance_uid, "Affected SOP Instance UID") if sop_instance_uid else new_uid()
        state = _state(ds, required=True)
        if state != MPPS_IN_PROGRESS:
            raise MppsRefused(
                INVALID_ATTRIBUTE_VALUE,
                "mpps_create_not_in_progress",
                f"N-CREATE with Performed Procedure Step Status {state}: it must be IN PROGRESS (PS3.4 F.7.2.1)",
            )
        studies = _study_uids(ds)
        refs = _references(ds) or []
        now = datetime.now(UTC)
        try:
            with self.engine.begin() as conn:
                pk = conn.execute(
                    insert(STEPS)
                    .values(
                        sop_instance_uid=uid,
                        state=state,
                        study_instance_uid=studies[0] if studies else None,
                        calling_ae=peer.calling_ae,
                        remote_ip=peer.remote_ip,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(STEPS.c.id)
                ).scalar_one()
                self._write_studies(conn, pk, studies)
                self._write_refs(conn, pk, refs)
        except IntegrityError as exc:
            raise MppsRefused(
                DUPLICATE_SOP_INSTANCE, "mpps_duplicate", "N-CREATE of an MPPS SOP Instance that exists already"
            ) from exc
        log.info(
            "mpps created",
            extra=kv(mpps=pk, calling_ae=printable(peer.calling_ae), studies=len(studies), references=len(refs)),
        )
        return uid

    def set(self, sop_instance_uid: str | None, ds: Dataset, peer: Peer) -> str:
        """N-SET: update a step IN PROGRESS; returns its state afterwards."""
        uid = _uid(sop_instance_uid, "Requested SOP Instance UID")
        state = _state(ds, required=False)
        refs = _references(ds)
        with self.engine.begin() as conn:
            row = conn.execute(
                select(STEPS.c.id, STEPS.c.state).where(STEPS.c.sop_instance_uid == uid).with_for_update()
            ).first()
            if row is None:
                raise MppsRefused(NO_SUCH_SOP_INSTANCE, "mpps_no_such_instance", "N-SET of an unknown MPPS instance")
            if row.state in MPPS_FINAL:
                raise MppsRefused(
                    PROCESSING_FAILURE,
                    "mpps_final",
                    f"N-SET of an MPPS already {row.state}: Performed Procedure Step Object may no longer be updated",
                )
            # Pending again (the completion monitor applies it anew, or holds its study while IN PROGRESS).
            values: dict[str, Any] = {"updated_at": datetime.now(UTC), "applied_at": None}
            if state is not None:
                values["state"] = state
            studies = _study_uids(ds) if "ScheduledStepAttributesSequence" in ds else None
            if studies is not None:
                values["study_instance_uid"] = studies[0] if studies else None
            conn.execute(update(STEPS).where(STEPS.c.id == row.id).values(**values))
            if studies is not None:  # replaced as a whole, like the references
                conn.execute(delete(STUDIES).where(STUDIES.c.mpps_pk == row.id))
                self._write_studies(conn, row.id, studies)
            if refs is not None:  # an N-SET value replaces the whole sequence (PS3.4 F.7.2.2)
                conn.execute(delete(REFS).where(REFS.c.mpps_pk == row.id))
                self._write_refs(conn, row.id, refs)
        new_state = state or row.state
        log.info(
            "mpps updated",
            extra=kv(mpps=row.id, state=new_state, calling_ae=printable(peer.calling_ae), references=len(refs or [])),
        )
        if new_state in MPPS_FINAL and self.on_final is not None:
            self.on_final()
        return new_state

    @staticmethod
    def _write_studies(conn: Any, mpps_pk: int, studies: list[str]) -> None:
        if studies:
            conn.execute(insert(STUDIES), [{"mpps_pk": mpps_pk, "study_instance_uid": uid} for uid in studies])

    @staticmethod
    def _write_refs(conn: Any, mpps_pk: int, refs: list[Reference]) -> None:
        if refs:
            conn.execute(
                insert(REFS),
                [
                    {"mpps_pk": mpps_pk, "series_instance_uid": r.series_instance_uid, "sop_instance_uid": sop}
                    for r in refs
                    for sop in (r.sop_instance_uid,)
                ],
            )

    # ------------------------------------------------------------------ pynetdicom event handlers

    def handle(self, kind: str, event: Any, peer: Peer) -> tuple[int | Dataset, Dataset | None]:
        """EVT_N_CREATE / EVT_N_SET: the status and the response's attribute list."""
        request = event.request
        try:
            try:
                ds = event.attribute_list if kind == "N-CREATE" else event.modification_list
                _ = [e.value for e in ds.iterall()]  # decode now: lazy decoding errors surface here
            except Exception as exc:
                raise MppsRefused(
                    PROCESSING_FAILURE, "mpps_unparsable", f"{kind} attribute list cannot be decoded"
                ) from exc
            if kind == "N-CREATE":
                asked = request.AffectedSOPInstanceUID
                uid = self.create(str(asked) if asked else None, ds, peer)
                rsp = Dataset()
                if not asked:  # pynetdicom moves it into the N-CREATE-RSP (PS3.7 10.1.5.1.4)
                    rsp.AffectedSOPInstanceUID = uid
                return SUCCESS, rsp
            self.set(str(request.RequestedSOPInstanceUID or ""), ds, peer)
            return SUCCESS, Dataset()
        except MppsRefused as exc:
            log.warning(
                "mpps refused",
                extra=kv(
                    op=kind, status=f"0x{exc.status:04X}", reason=exc.reason, calling_ae=printable(peer.calling_ae)
                ),
            )
            record_rejection(
                self.engine,
                stage="mpps",
                reason=exc.reason,
                detail=exc.detail,
                status=exc.status,
                peer=peer,
                sop_class_uid=MPPS_SOP_CLASS,
            )
            return _status(exc.status, exc.detail), None
        except Exception:
            log.exception("mpps failed", extra=kv(op=kind, calling_ae=printable(peer.calling_ae)))
            record_rejection(
                self.engine,
                stage="mpps",
                reason="processing_failure",
                detail=f"{kind} failed inside the node",
                status=PROCESSING_FAILURE,
                peer=peer,
                sop_class_uid=MPPS_SOP_CLASS,
            )
            return _status(PROCESSING_FAILURE, f"{kind} failed inside the node"), None


def _status(code: int, comment: str) -> Dataset:
    """A failure status with its Error Comment (LO: 64 characters at most)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step SOP Class (PS3.4 F.7.1)
