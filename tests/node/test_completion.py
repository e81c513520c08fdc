"""Study completion: quiet periods, force-complete, revisions after completion, restarts."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from sqlmodel import Session, select

from dicom_node.completion import CompletionMonitor, StudyCompleted
from dicom_node.db import init_db, make_engine
from dicom_node.ingest import Peer
from dicom_node.models import Instance, Series, StudyRevision
from dicom_node.node import make_ingest
from tests.node.conftest import make_ct, store

PEER = Peer(calling_ae="MOD", called_ae="UNIMEDVL", remote_ip="127.0.0.1")


def _receive(ingest: Any, ds: Any) -> Any:
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return ingest.receive(b"\x00" * 128 + b"DICM" + meta.getvalue(), body.getvalue(), PEER,
                          transfer_syntax_uid=ds.file_meta.TransferSyntaxUID)  # fmt: skip


def _setup(make_settings: Any, db_url: str, **completion: float) -> tuple[Any, Any]:
    settings = make_settings(
        db_url,
        completion={
            "study_quiet_seconds": 60,
            "series_quiet_seconds": 30,
            "force_complete_seconds": 600,
            **completion,
        },
    )
    init_db(settings.database.url)
    return settings, make_ingest(settings)


def _revisions(engine: Any) -> list[StudyRevision]:
    with Session(engine) as s:
        return list(s.exec(select(StudyRevision).order_by(StudyRevision.revision)).all())


def test_quiet_completion_revision_and_restart(db_url: str, make_settings: Any) -> None:
    settings, ingest = _setup(make_settings, db_url)
    engine = ingest.engine
    delivered: list[StudyCompleted] = []
    monitor = CompletionMonitor(engine, settings)
    monitor.on_study_complete(delivered.append)
    study, s1, s2 = (pydicom.uid.generate_uid() for _ in range(3))
    for i in range(3):
        _receive(ingest, make_ct(study, s1, instance_number=i))
    _receive(ingest, make_ct(study, s2))
    t0 = datetime.now(UTC)

    assert monitor.poll(t0 + timedelta(seconds=10)) == []  # nothing is quiet yet
    with Session(engine) as s:
        assert {x.state for x in s.exec(select(Series)).all()} == {"receiving"}
    assert monitor.poll(t0 + timedelta(seconds=31)) == []  # series quiet, study not yet
    with Session(engine) as s:
        assert {x.state for x in s.exec(select(Series)).all()} == {"complete"}

    # A restarted monitor (new engine, new object) recomputes the timers from the DB alone.
    engine2 = make_engine(settings.database.url)
    restarted = CompletionMonitor(engine2, settings)
    restarted.on_study_complete(delivered.append)
    events = restarted.poll(t0 + timedelta(seconds=61))
    assert len(events) == 1 and delivered == events
    ev = events[0]
    assert (ev.study_instance_uid, ev.revision, ev.reason, ev.instance_count) == (study, 1, "quiet", 4)
    assert set(ev.series_uids) == {s1, s2}
    assert restarted.poll(t0 + timedelta(seconds=200)) == []  # delivered once

    # An instance after completion opens revision 2 instead of merging silently.
    late = make_ct(study, s2, instance_number=9)
    out = _receive(ingest, late)
    assert out.revision == 2
    revs = _revisions(engine)
    assert [(r.revision, r.state) for r in revs] == [(1, "complete"), (2, "receiving")]
    t1 = datetime.now(UTC)
    events = restarted.poll(t1 + timedelta(seconds=61))
    assert [(e.revision, e.instance_count, e.series_uids) for e in events] == [(2, 1, (s2,))]
    with Session(engine) as s:
        rows = s.exec(select(Instance)).all()
        assert len(rows) == 5 and sorted(r.revision for r in rows) == [1, 1, 1, 1, 2]
    # Re-sending identical bytes after completion changes nothing.
    _receive(ingest, late)
    assert [r.state for r in _revisions(engine)] == ["complete", "complete"]
    engine2.dispose()


def test_force_complete(db_url: str, make_settings: Any) -> None:
    settings, ingest = _setup(make_settings, db_url, force_complete_seconds=120)
    monitor = CompletionMonitor(ingest.engine, settings)
    study = pydicom.uid.generate_uid()
    _receive(ingest, make_ct(study))
    t0 = datetime.now(UTC)
    # Instances keep trickling in: never quiet, but forced after force_complete_seconds.
    with Session(ingest.engine) as s:
        rev = s.exec(select(StudyRevision)).one()
        rev.last_received_at = t0 + timedelta(seconds=119)
        s.add(rev)
        s.commit()
    assert monitor.poll(t0 + timedelta(seconds=100)) == []
    (ev,) = monitor.poll(t0 + timedelta(seconds=121))
    assert ev.reason == "force"
    with Session(ingest.engine) as s:
        assert {x.state for x in s.exec(select(Series)).all()} == {"complete"}


def test_failed_subscriber_is_redelivered(db_url: str, make_settings: Any) -> None:
    settings, ingest = _setup(make_settings, db_url)
    monitor = CompletionMonitor(ingest.engine, settings)
    calls: list[int] = []

    def flaky(ev: StudyCompleted) -> None:
        calls.append(ev.revision)
        if len(calls) == 1:
            raise RuntimeError("planner down")

    monitor.on_study_complete(flaky)
    _receive(ingest, make_ct())
    later = datetime.now(UTC) + timedelta(seconds=61)
    assert monitor.poll(later) == []
    assert len(monitor.poll(later)) == 1
    assert monitor.poll(later) == []
    assert calls == [1, 1]
    assert _revisions(ingest.engine)[0].notified_at is not None


def test_running_node_completes_study(db_url: str, make_settings: Any, start_node: Any) -> None:
    """End to end with real time: short quiet periods, the monitor thread of a running node."""
    node = start_node(make_settings(db_url))
    got: list[StudyCompleted] = []
    node.monitor.on_study_complete(got.append)
    study = pydicom.uid.generate_uid()
    assert [s.Status for s in store(node.port, [make_ct(study, instance_number=i) for i in range(3)])] == [0] * 3
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(got) == 1 and got[0].study_instance_uid == study and got[0].instance_count == 3
    # The quiet period was waited for; how soon after it completion fires is a benchmark figure
    # (benchmarks/e2e.py, "completion lag"), not a test bound.
    assert got[0].latency_seconds >= 0.5


def test_next_deadline_is_the_earliest_open_timer(db_url: str, make_settings: Any) -> None:
    """What the background loop sleeps until: the earliest quiet / announced-wait / force timer
    still ahead of `now`, from the index alone; None once nothing is open."""
    settings, ingest = _setup(make_settings, db_url, announced_wait_seconds=300, images_in_acquisition=True)
    monitor = CompletionMonitor(ingest.engine, settings)
    assert monitor.next_deadline(datetime.now(UTC)) is None  # nothing open
    study = pydicom.uid.generate_uid()
    ds = make_ct(study)
    ds.ImagesInAcquisition, ds.AcquisitionNumber = 2, 1  # announces one more instance than it sends
    _receive(ingest, ds)
    with Session(ingest.engine) as s:
        last = s.exec(select(Series)).one().last_received_at
    t = last + timedelta(seconds=1)
    assert monitor.next_deadline(t) == last + timedelta(seconds=30)  # the series' quiet period
    t = last + timedelta(seconds=31)
    assert monitor.poll(t) == []  # quiet, but held for its count: nothing completed
    assert monitor.next_deadline(t) == last + timedelta(seconds=60)  # the study's quiet period
    assert monitor.next_deadline(last + timedelta(seconds=61)) == last + timedelta(seconds=300)  # announced wait
    assert len(monitor.poll(last + timedelta(seconds=301))) == 1
    assert monitor.next_deadline(last + timedelta(seconds=301)) is None


def test_monitor_sleeps_until_the_quiet_deadline_not_the_interval(
    db_url: str, make_settings: Any, start_node: Any
) -> None:
    """1 s quiet periods, a 30 s safety interval: the monitor, asleep on an idle index, is woken by
    the new series, then sleeps exactly until the quiet period after the last instance ends."""
    interval = 30.0
    quiet = {"study_quiet_seconds": 1, "series_quiet_seconds": 1, "check_interval_seconds": interval}
    node = start_node(make_settings(db_url, completion=quiet))
    got: list[StudyCompleted] = []
    node.monitor.on_study_complete(got.append)
    time.sleep(0.2)  # its first round found nothing open: it now sleeps the safety interval
    study = pydicom.uid.generate_uid()
    sent = [make_ct(study, instance_number=i) for i in range(4)]
    assert [s.Status for s in store(node.port, sent)] == [0] * 4
    deadline = time.monotonic() + 15
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(got) == 1 and got[0].instance_count == 4 and got[0].reason == "quiet"
    # Recorded times, relative to the last instance: the quiet period, plus a bound generous for
    # a loaded machine yet far below the 30 s interval the monitor used to sleep.
    assert 1.0 <= got[0].latency_seconds < 6.0
