"""The index: patients, studies (with revisions), series, instances, duplicates and rejections.

Times are aware UTC datetimes (SQLModel's UTCDateTime). Received strings are stored as text
as they came (NUL replaced), never used as paths. The migration that creates these tables is
`dicom_node/migrations/versions/0001_initial.py`; keep both in step.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

RECEIVING = "receiving"
COMPLETE = "complete"
# Why a series or a study revision completed (dicom_node/completion.py).
REASON_QUIET = "quiet"  # no instance for the quiet period
REASON_FORCE = "force"  # force_complete_seconds after the first instance
REASON_MPPS = "mpps"  # a COMPLETED/DISCONTINUED MPPS listed it and every listed instance arrived
REASON_COUNT = "count"  # as many instances as every instance's ImagesInAcquisition said

# Mpps.state: Performed Procedure Step Status (0040,0252), PS3.3 C.4.14
MPPS_IN_PROGRESS = "IN PROGRESS"
MPPS_COMPLETED = "COMPLETED"
MPPS_DISCONTINUED = "DISCONTINUED"
MPPS_FINAL = (MPPS_COMPLETED, MPPS_DISCONTINUED)

# DuplicateEvent.action
KEPT_FIRST = "kept_first"  # the stored instance stays; the new bytes are kept aside (received_relpath)
REPLACED = "replaced"  # the new bytes became the instance; the old ones are kept aside (previous_relpath)


class Patient(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # sha256 of the PatientID: a fixed-size unique key whatever the sender puts in PatientID.
    patient_key: str = Field(max_length=64, unique=True)
    patient_id: str = Field(sa_column=Column(Text, nullable=False))
    patient_name: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime


class Study(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    study_instance_uid: str = Field(max_length=64, unique=True)
    patient_pk: int = Field(foreign_key="patient.id", index=True)
    accession_number: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    study_date: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    study_description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    current_revision: int = 1
    instance_count: int = 0
    created_at: datetime
    last_received_at: datetime


class StudyRevision(SQLModel, table=True):
    """One receive episode of a study: instances arriving after completion open revision n+1."""

    __tablename__ = "study_revision"
    __table_args__ = (
        UniqueConstraint("study_pk", "revision", name="uq_study_revision"),
        Index("ix_study_revision_state", "state"),
    )

    id: int | None = Field(default=None, primary_key=True)
    study_pk: int = Field(foreign_key="study.id")
    revision: int
    state: str = Field(default=RECEIVING, max_length=16)
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None = None
    reason: str | None = Field(default=None, max_length=16)  # quiet | force | mpps | count
    # Set once every completion subscriber has run: unset ones are re-delivered after a restart.
    notified_at: datetime | None = None
    instance_count: int = 0


class Series(SQLModel, table=True):
    __table_args__ = (Index("ix_series_state", "state"),)

    id: int | None = Field(default=None, primary_key=True)
    series_instance_uid: str = Field(max_length=64, unique=True)
    study_pk: int = Field(foreign_key="study.id", index=True)
    modality: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    body_part_examined: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    series_description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    series_number: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    state: str = Field(default=RECEIVING, max_length=16)
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None = None
    instance_count: int = 0
    completion_reason: str | None = Field(default=None, max_length=16)  # quiet | force | mpps | count
    # ImagesInAcquisition of the series' instances while all of them carried the same value and
    # the same AcquisitionNumber (a series of two acquisitions is not counted); count_known turns
    # false for good once one instance lacks it or differs (dicom_node/ingest.py).
    expected_instances: int | None = None
    count_acquisition: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    count_known: bool = False
    # NumberOfSeriesRelatedInstances the sending PACS answered to our C-FIND (completion.count_sources).
    queried_instances: int | None = None


class Instance(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    sop_instance_uid: str = Field(max_length=64, unique=True)
    sop_class_uid: str = Field(max_length=64)
    series_pk: int = Field(foreign_key="series.id", index=True)
    study_pk: int = Field(foreign_key="study.id", index=True)
    revision: int  # the study revision this instance (last) arrived in
    instance_number: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    rows: int | None = None
    columns: int | None = None
    transfer_syntax_uid: str = Field(max_length=64)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64)
    relpath: str = Field(max_length=512)
    calling_ae: str = Field(max_length=16)
    called_ae: str = Field(max_length=16)
    remote_ip: str = Field(max_length=64)
    received_at: datetime
    duplicate_count: int = 0  # re-sends of this SOP Instance UID (identical or not)
    last_duplicate_at: datetime | None = None


class DuplicateEvent(SQLModel, table=True):
    """A re-send of a known SOP Instance UID with different bytes (identical ones are only counted)."""

    __tablename__ = "duplicate_event"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(index=True)
    instance_pk: int = Field(foreign_key="instance.id", index=True)
    sop_instance_uid: str = Field(max_length=64)
    policy: str = Field(max_length=16)
    action: str = Field(max_length=16)  # kept_first | replaced
    previous_sha256: str = Field(max_length=64)
    previous_relpath: str = Field(max_length=512)
    received_sha256: str = Field(max_length=64)
    received_relpath: str = Field(max_length=512)
    received_size: int = Field(sa_column=Column(BigInteger, nullable=False))
    calling_ae: str = Field(max_length=16)
    remote_ip: str = Field(max_length=64)


class Rejection(SQLModel, table=True):
    """An association or a C-STORE we refused, with the reason a person can act on (no PHI)."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(index=True)
    stage: str = Field(max_length=16)  # association | store
    reason: str = Field(max_length=32, index=True)
    detail: str = Field(sa_column=Column(Text, nullable=False))
    status: int | None = None  # DIMSE status returned, for stage=store
    calling_ae: str | None = Field(default=None, max_length=16)
    called_ae: str | None = Field(default=None, max_length=16)
    remote_ip: str | None = Field(default=None, max_length=64)
    sop_class_uid: str | None = Field(default=None, max_length=64)


class Mpps(SQLModel, table=True):
    """A Modality Performed Procedure Step instance we manage (PS3.4 Annex F), created by N-CREATE
    and updated by N-SET until COMPLETED or DISCONTINUED."""

    __table_args__ = (
        Index("ix_mpps_study_instance_uid", "study_instance_uid"),
        Index("ix_mpps_applied_at", "applied_at"),  # the monitor's rounds look for the pending (NULL) ones
    )

    id: int | None = Field(default=None, primary_key=True)
    sop_instance_uid: str = Field(max_length=64, unique=True)
    state: str = Field(max_length=16)  # IN PROGRESS | COMPLETED | DISCONTINUED
    # First StudyInstanceUID of the Scheduled Step Attributes Sequence (0040,0270); every one
    # of them (a step may name several studies, PS3.4 F.7.2 / F.8) is a row of `mpps_study`.
    study_instance_uid: str | None = Field(default=None, max_length=64)
    calling_ae: str = Field(max_length=16)
    remote_ip: str = Field(max_length=64)
    created_at: datetime
    updated_at: datetime
    # When the completion monitor found every referenced instance and completed their series.
    applied_at: datetime | None = None


class MppsReference(SQLModel, table=True):
    """One instance a performed procedure step lists (Performed Series Sequence ->
    Referenced Image / Non-Image Composite SOP Instance Sequence)."""

    __tablename__ = "mpps_reference"
    __table_args__ = (UniqueConstraint("mpps_pk", "sop_instance_uid", name="uq_mpps_reference"),)

    id: int | None = Field(default=None, primary_key=True)
    mpps_pk: int = Field(foreign_key="mpps.id", index=True)
    series_instance_uid: str = Field(max_length=64)
    sop_instance_uid: str = Field(max_length=64, index=True)


class MppsStudy(SQLModel, table=True):
    """One study a performed procedure step names: the Study Instance UID of each item of its
    Scheduled Step Attributes Sequence (0040,0270); one step may perform several requested
    procedures of different studies (PS3.4 F.7.2, Table F.7.2-1; the group case of F.8)."""

    __tablename__ = "mpps_study"
    __table_args__ = (UniqueConstraint("mpps_pk", "study_instance_uid", name="uq_mpps_study"),)

    id: int | None = Field(default=None, primary_key=True)
    mpps_pk: int = Field(foreign_key="mpps.id", index=True)
    study_instance_uid: str = Field(max_length=64, index=True)
