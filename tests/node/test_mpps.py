"""Completion without waiting: Modality Performed Procedure Step (PS3.4 Annex F) from pynetdicom
as the MPPS SCU, and its failure statuses."""

from __future__ import annotations

import io
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from rich.console import Console
from sqlmodel import Session, select

from dicom_node.api import study_detail
from dicom_node.completion import CompletionMonitor, StudyCompleted
from dicom_node.console.tree import timeline_tree
from dicom_node.jobs.admin import study_timeline
from dicom_node.metrics import IndexCollector
from dicom_node.models import Mpps, MppsStudy, Rejection, Series, StudyRevision
from tests.node.conftest import NODE_AET, make_ct, store

TIMERS = {"study_quiet_seconds": 60, "series_quiet_seconds": 30, "force_complete_seconds": 3600}
SLOW = {"study_quiet_seconds": 600, "series_quiet_seconds": 600, "force_complete_seconds": 3600}


def _mpps_assoc(port: int, calling: str = "MODALITY") -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(ModalityPerformedProcedureStep)
    return ae.associate("127.0.0.1", port, ae_title=NODE_AET)


def _create_ds(study_uid: str, state: str = "IN PROGRESS", *more_studies: str) -> Dataset:
    ds = Dataset()
    ds.ScheduledStepAttributesSequence = []
    for n, uid in enumerate((study_uid, *more_studies), 1):
        item = Dataset()
        item.StudyInstanceUID = uid
        item.AccessionNumber = f"ACC{n}"
        ds.ScheduledStepAttributesSequence.append(item)
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PAT-1"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "MODALITY"
    ds.PerformedProcedureStepStartDate = "20250101"
    ds.PerformedProcedureStepStartTime = "120000"
    ds.PerformedProcedureStepStatus = state
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = []
    return ds


def _final_ds(state: str, series: dict[str, list[str]]) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = state
    ds.PerformedProcedureStepEndDate = "20250101"
    ds.PerformedProcedureStepEndTime = "121000"
    items = []
    for series_uid, sops in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedImageSequence = []
        for sop in sops:
            ref = Dataset()
            ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            ref.ReferencedSOPInstanceUID = sop
            item.ReferencedImageSequence.append(ref)
        items.append(item)
    ds.PerformedSeriesSequence = items
    return ds


def _n_create(assoc: Any, ds: Dataset, uid: str | None) -> int:
    status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
    return int(status.Status)


def _n_set(assoc: Any, ds: Dataset, uid: str) -> int:
    status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
    return int(status.Status)


def _wait(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_mpps_completed_completes_when_the_last_listed_instance_lands(
    db_url: str, make_settings: Any, start_node: Any
) -> None:
    """A running node with 600 s quiet periods: the study completes (reason mpps) within seconds of
    the last instance the COMPLETED step lists, which arrives after the N-SET."""
    node = start_node(make_settings(db_url, completion={**SLOW, "check_interval_seconds": 0.2}))
    got: list[StudyCompleted] = []
    node.monitor.on_study_complete(got.append)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    cts = [make_ct(study, series, instance_number=i) for i in range(4)]
    mpps_uid = pydicom.uid.generate_uid()
    assoc = _mpps_assoc(node.port)
    assert assoc.is_established
    try:
        assert _n_create(assoc, _create_ds(study), mpps_uid) == 0x0000
        assert [s.Status for s in store(node.port, cts[:3])] == [0] * 3
        listed = {series: [ds.SOPInstanceUID for ds in cts]}
        assert _n_set(assoc, _final_ds("COMPLETED", listed), mpps_uid) == 0x0000
    finally:
        assoc.release()
    with Session(node.engine) as s:
        step = s.exec(select(Mpps).where(Mpps.sop_instance_uid == mpps_uid)).one()
        assert step.state == "COMPLETED" and step.study_instance_uid == study
    # One listed instance is still missing: a round finds nothing to complete.
    assert node.monitor.poll() == [] and got == []
    with Session(node.engine) as s:
        assert s.exec(select(Series.state)).all() == ["receiving"]
        assert s.exec(select(Mpps.applied_at)).one() is None
    assert [s.Status for s in store(node.port, cts[3:])] == [0]
    _wait(lambda: got, "the mpps completion")
    (ev,) = got
    assert (ev.study_instance_uid, ev.reason, ev.instance_count) == (study, "mpps", 4)
    assert ev.latency_seconds < 600  # the quiet period (600 s) did not decide it
    with Session(node.engine) as s:
        assert s.exec(select(Series.completion_reason)).all() == ["mpps"]
        assert s.exec(select(Mpps.applied_at)).one() is not None
    timeline = study_timeline(node.engine, study)
    assert timeline is not None and timeline["revisions"][0]["completed_because"] == "mpps"
    assert timeline["revisions"][0]["series"] == [
        {"series_instance_uid": series, "state": "complete", "completed_because": "mpps"}
    ]
    detail = study_detail(node.engine, ev.study_pk)  # the console's study page and /api/studies/{id}
    assert detail is not None and [(x["state"], x["completion_reason"]) for x in detail["series"]] == [
        ("complete", "mpps")
    ]
    metrics = IndexCollector(node.engine).collect()
    (completions,) = [m for m in metrics if m.name == "unimedvl_study_completions"]
    assert [(x.labels, x.value) for x in completions.samples if x.name.endswith("_total")] == [({"reason": "mpps"}, 1)]
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(timeline_tree(timeline))  # what `unimedvl timeline` prints
    text = console.export_text()
    assert f"series {series}: complete (mpps)" in text and re.search(r"complete .* \(mpps\)", text)


def test_mpps_hold_discontinued_and_late_instance(db_url: str, make_settings: Any, start_node: Any) -> None:
    """Monitor rounds at chosen times: an IN PROGRESS step holds a paused study past its quiet
    periods; DISCONTINUED completes what it lists at once; a late instance opens revision 2,
    which completes by the quiet period."""
    settings = make_settings(db_url, completion={**TIMERS})
    node = start_node(settings, completion=False)
    monitor = CompletionMonitor(node.engine, settings)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    cts = [make_ct(study, series, instance_number=i) for i in range(3)]
    mpps_uid = pydicom.uid.generate_uid()
    assoc = _mpps_assoc(node.port)
    try:
        assert _n_create(assoc, _create_ds(study), mpps_uid) == 0x0000
        assert [s.Status for s in store(node.port, cts[:2])] == [0, 0]
        t0 = datetime.now(UTC)
        # The sender pauses for 5 minutes, far past both quiet periods: the step holds the study.
        assert monitor.poll(t0 + timedelta(seconds=300)) == []
        with Session(node.engine) as s:
            assert s.exec(select(Series.state)).all() == ["receiving"]
        assert [s.Status for s in store(node.port, cts[2:])] == [0]
        listed = {series: [ds.SOPInstanceUID for ds in cts]}
        assert _n_set(assoc, _final_ds("DISCONTINUED", listed), mpps_uid) == 0x0000
    finally:
        assoc.release()
    (ev,) = monitor.poll()  # now: long before any quiet period ends
    assert (ev.revision, ev.reason, ev.instance_count) == (1, "mpps", 3)

    late = make_ct(study, series, instance_number=9)
    assert [s.Status for s in store(node.port, [late])] == [0]
    assert monitor.poll() == []  # the applied step no longer decides anything
    t1 = datetime.now(UTC)
    (ev2,) = monitor.poll(t1 + timedelta(seconds=61))
    assert (ev2.revision, ev2.reason, ev2.instance_count) == (2, "quiet", 1)
    with Session(node.engine) as s:
        revs = s.exec(select(StudyRevision).order_by(StudyRevision.revision)).all()
        assert [(r.revision, r.reason) for r in revs] == [(1, "mpps"), (2, "quiet")]


def test_in_progress_step_held_only_until_announced_wait(db_url: str, make_settings: Any, start_node: Any) -> None:
    """A step that never ends does not hold a study for ever: after announced_wait_seconds the
    quiet rule applies again."""
    settings = make_settings(db_url, completion={**TIMERS, "announced_wait_seconds": 120})
    node = start_node(settings, completion=False)
    monitor = CompletionMonitor(node.engine, settings)
    study = pydicom.uid.generate_uid()
    assoc = _mpps_assoc(node.port)
    try:
        assert _n_create(assoc, _create_ds(study), None) == 0x0000  # the SCP assigns the UID
    finally:
        assoc.release()
    assert [s.Status for s in store(node.port, [make_ct(study)])] == [0]
    t0 = datetime.now(UTC)
    assert monitor.poll(t0 + timedelta(seconds=100)) == []
    (ev,) = monitor.poll(t0 + timedelta(seconds=121))
    assert ev.reason == "quiet"
    # After force_complete_seconds without an update the step is given up: it holds nothing more.
    monitor.poll(t0 + timedelta(seconds=3500))
    with Session(node.engine) as s:
        assert s.exec(select(Mpps.applied_at)).one() is None
    monitor.poll(t0 + timedelta(seconds=3700))
    with Session(node.engine) as s:
        assert s.exec(select(Mpps.applied_at)).one() is not None


def test_bad_mpps_gets_the_standard_status(
    db_url: str, make_settings: Any, start_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = start_node(
        make_settings(db_url, node={"allowed_calling_aets": ["MODALITY"]}, completion=SLOW), completion=False
    )
    study = pydicom.uid.generate_uid()
    uid = pydicom.uid.generate_uid()
    assoc = _mpps_assoc(node.port)
    try:
        # N-SET of an instance never created: 0x0112 No Such SOP Instance.
        assert _n_set(assoc, _final_ds("COMPLETED", {}), pydicom.uid.generate_uid()) == 0x0112
        # N-CREATE in a state other than IN PROGRESS: 0x0106 Invalid Attribute Value.
        assert _n_create(assoc, _create_ds(study, "COMPLETED"), pydicom.uid.generate_uid()) == 0x0106
        # Without Performed Procedure Step Status (Type 1): 0x0120 Missing Attribute.
        no_state = _create_ds(study)
        del no_state.PerformedProcedureStepStatus
        assert _n_create(assoc, no_state, pydicom.uid.generate_uid()) == 0x0120
        assert _n_create(assoc, _create_ds(study), uid) == 0x0000
        # N-CREATE of an existing instance: 0x0111 Duplicate SOP Instance.
        assert _n_create(assoc, _create_ds(study), uid) == 0x0111
        # An unknown status value, a malformed referenced UID: 0x0106.
        assert _n_set(assoc, _final_ds("FINISHED", {}), uid) == 0x0106
        assert _n_set(assoc, _final_ds("COMPLETED", {pydicom.uid.generate_uid(): ["1.2.x"]}), uid) == 0x0106
        assert _n_set(assoc, _final_ds("COMPLETED", {}), uid) == 0x0000
        # N-SET after COMPLETED: 0x0110, "Performed Procedure Step Object may no longer be updated",
        # the reason in the response's Error Comment.
        status, _ = assoc.send_n_set(_final_ds("DISCONTINUED", {}), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0110 and status.ErrorComment.startswith("N-SET of an MPPS already COMPLETED")
    finally:
        assoc.release()
    with Session(node.engine) as s:
        rows = s.exec(select(Rejection).where(Rejection.stage == "mpps").order_by(Rejection.id)).all()
        assert [(r.reason, r.status) for r in rows] == [
            ("mpps_no_such_instance", 0x0112),
            ("mpps_create_not_in_progress", 0x0106),
            ("mpps_missing_status", 0x0120),
            ("mpps_duplicate", 0x0111),
            ("mpps_bad_status", 0x0106),
            ("mpps_bad_uid", 0x0106),
            ("mpps_final", 0x0110),
        ]
        assert all(r.calling_ae == "MODALITY" and r.detail for r in rows)
        assert s.exec(select(Mpps.state)).all() == ["COMPLETED"]
    assert "mpps refused" in caplog.text
    assert "Test^Patient" not in caplog.text and "PAT-1" not in caplog.text  # no patient data in logs
    # The calling-AE allow-list applies to MPPS as to C-STORE: the association is rejected.
    other = _mpps_assoc(node.port, calling="STRANGER")
    assert other.is_rejected


def test_listener_processes_wake_the_monitor(db_url: str, make_settings: Any, start_node: Any) -> None:
    """[node] listeners = 2: MPPS N-SET, a count reached and the last instance a COMPLETED step
    waited for arrive in listener processes, and reach the monitor in this (the supervisor's)
    process by notification (PostgreSQL NOTIFY / the SQLite wake-up socket), not by its 30 s
    safety interval or the 600 s quiet periods."""
    interval = 30.0
    settings = make_settings(db_url, node={"listeners": 2}, completion={**SLOW, "check_interval_seconds": interval})
    node = start_node(settings)
    got: list[StudyCompleted] = []
    node.monitor.on_study_complete(got.append)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    cts = [make_ct(study, series, instance_number=i) for i in range(3)]
    mpps_uid = pydicom.uid.generate_uid()
    assoc = _mpps_assoc(node.port)
    assert assoc.is_established
    try:
        assert _n_create(assoc, _create_ds(study), mpps_uid) == 0x0000
        assert [s.Status for s in store(node.port, cts[:2])] == [0, 0]
        listed = {series: [ds.SOPInstanceUID for ds in cts]}
        assert _n_set(assoc, _final_ds("COMPLETED", listed), mpps_uid) == 0x0000
    finally:
        assoc.release()
    # The monitor, woken by the N-SET, now wants every instance: the last one wakes it again.
    _wait(lambda: node._every_instance.value == 1, "the monitor to ask for every instance")
    assert [s.Status for s in store(node.port, cts[2:])] == [0]
    _wait(lambda: got, "the mpps completion", timeout=interval / 2)
    assert (got[0].study_instance_uid, got[0].reason, got[0].instance_count) == (study, "mpps", 3)
    assert got[0].latency_seconds < interval / 2

    counted, counted_series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    pair = [make_ct(counted, counted_series, instance_number=i) for i in range(2)]
    for ds in pair:
        ds.ImagesInAcquisition, ds.AcquisitionNumber = 2, 1
    assert [s.Status for s in store(node.port, pair)] == [0, 0]
    _wait(lambda: len(got) == 2, "the count completion", timeout=interval / 2)
    assert (got[1].study_instance_uid, got[1].reason) == (counted, "count")
    assert got[1].latency_seconds < interval / 2


def test_mpps_naming_several_studies_holds_and_completes_each(db_url: str, make_settings: Any, start_node: Any) -> None:
    """One step performing requested procedures of two studies (two Scheduled Step Attributes
    Sequence items, PS3.4 F.7.2 / F.8): both studies are held while it is IN PROGRESS and both
    complete (mpps) when it is COMPLETED, each with its own listed series."""
    settings = make_settings(db_url, completion={**TIMERS})
    node = start_node(settings, completion=False)
    monitor = CompletionMonitor(node.engine, settings)
    studies = [pydicom.uid.generate_uid() for _ in range(2)]
    series = [pydicom.uid.generate_uid() for _ in range(2)]
    cts = {se: [make_ct(st, se, instance_number=i) for i in range(2)] for st, se in zip(studies, series, strict=True)}
    mpps_uid = pydicom.uid.generate_uid()
    assoc = _mpps_assoc(node.port)
    try:
        assert _n_create(assoc, _create_ds(studies[0], "IN PROGRESS", studies[1]), mpps_uid) == 0x0000
        assert [s.Status for s in store(node.port, [ds for group in cts.values() for ds in group])] == [0] * 4
        t0 = datetime.now(UTC)
        # Paused past every quiet period: the step holds both studies, not only the first.
        assert monitor.poll(t0 + timedelta(seconds=300)) == []
        with Session(node.engine) as s:
            assert s.exec(select(Series.state)).all() == ["receiving", "receiving"]
            assert sorted(s.exec(select(MppsStudy.study_instance_uid)).all()) == sorted(studies)
        listed = {se: [ds.SOPInstanceUID for ds in group] for se, group in cts.items()}
        assert _n_set(assoc, _final_ds("COMPLETED", listed), mpps_uid) == 0x0000
    finally:
        assoc.release()
    events = monitor.poll()  # now: long before any quiet period ends
    assert sorted((e.study_instance_uid, e.reason, e.instance_count, e.series_uids) for e in events) == sorted(
        (st, "mpps", 2, (se,)) for st, se in zip(studies, series, strict=True)
    )


def test_upgrade_keeps_the_study_of_steps_stored_before_0009(db_url: str) -> None:
    """Steps stored under 0008 named one study (`mpps.study_instance_uid`): the upgrade copies it
    into `mpps_study`, so a pending step keeps holding its study."""
    from sqlalchemy import text

    from dicom_node.db import init_db, make_engine

    init_db(db_url, "0008_completion_reason")
    engine = make_engine(db_url)
    study = pydicom.uid.generate_uid()
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO mpps (sop_instance_uid, state, study_instance_uid, calling_ae, remote_ip,"
                    " created_at, updated_at) VALUES ('1.2.3', 'IN PROGRESS', :study, 'MOD', '127.0.0.1', :t, :t),"
                    " ('1.2.4', 'IN PROGRESS', NULL, 'MOD', '127.0.0.1', :t, :t)"
                ),
                {"study": study, "t": datetime.now(UTC)},
            )
        init_db(db_url)
        with Session(engine) as s:
            assert [(r.mpps_pk, r.study_instance_uid) for r in s.exec(select(MppsStudy)).all()] == [(1, study)]
    finally:
        engine.dispose()
