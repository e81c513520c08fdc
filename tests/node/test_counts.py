"""Count-based completion: a series whose instances all carry the same ImagesInAcquisition
(0020,1002) completes when that many have arrived, and waits for them past the quiet period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pydicom
from sqlmodel import Session, select

from dicom_node.completion import CompletionMonitor
from dicom_node.models import Series
from tests.node.conftest import make_ct
from tests.node.test_completion import _receive, _setup


def _counted(study: str, series: str, i: int, count: int | None, acquisition: int | None = 1) -> Any:
    ds = make_ct(study, series, instance_number=i)
    if count is not None:
        ds.ImagesInAcquisition = count
    if acquisition is not None:
        ds.AcquisitionNumber = acquisition
    return ds


def _series(engine: Any) -> dict[str, tuple[str, str | None]]:
    with Session(engine) as s:
        return {x.series_instance_uid: (x.state, x.completion_reason) for x in s.exec(select(Series)).all()}


def test_images_in_acquisition_completes_the_series_and_holds_a_paused_one(db_url: str, make_settings: Any) -> None:
    settings, ingest = _setup(make_settings, db_url, announced_wait_seconds=600)
    monitor = CompletionMonitor(ingest.engine, settings)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    assert [_receive(ingest, _counted(study, series, i, 3)).count_reached for i in range(2)] == [False, False]
    t0 = datetime.now(UTC)
    # The sender pauses longer than both quiet periods (30 s / 60 s) with 2 of 3 sent: held.
    assert monitor.poll(t0 + timedelta(seconds=300)) == []
    assert _series(ingest.engine)[series] == ("receiving", None)
    assert _receive(ingest, _counted(study, series, 2, 3)).count_reached  # the listener wakes the monitor
    (ev,) = monitor.poll()  # now: no quiet period has passed
    assert (ev.reason, ev.instance_count) == ("count", 3)
    assert _series(ingest.engine)[series] == ("complete", "count")
    # Late instances past the count open revision 2, which waits for the quiet period (one
    # revision for all of them, not one each).
    for i in (3, 4):
        assert _receive(ingest, _counted(study, series, i, 3)).revision == 2
    assert monitor.poll() == []
    assert _series(ingest.engine)[series] == ("receiving", None)
    (ev2,) = monitor.poll(datetime.now(UTC) + timedelta(seconds=61))
    assert (ev2.revision, ev2.reason, ev2.instance_count) == (2, "quiet", 2)


def test_counts_only_when_every_instance_agrees(db_url: str, make_settings: Any) -> None:
    """A missing or differing count, or a second acquisition, leaves the series to the quiet rule;
    a count never reached is given up after announced_wait_seconds."""
    settings, ingest = _setup(make_settings, db_url, announced_wait_seconds=200)
    monitor = CompletionMonitor(ingest.engine, settings)
    study = pydicom.uid.generate_uid()
    missing, differs, two_acq, short, frames = (pydicom.uid.generate_uid() for _ in range(5))
    _receive(ingest, _counted(study, missing, 1, 2))
    _receive(ingest, _counted(study, missing, 2, None))
    _receive(ingest, _counted(study, differs, 1, 2))
    _receive(ingest, _counted(study, differs, 2, 3))
    _receive(ingest, _counted(study, two_acq, 1, 2, acquisition=1))
    _receive(ingest, _counted(study, two_acq, 2, 2, acquisition=2))
    _receive(ingest, _counted(study, short, 1, 5))
    multi = _counted(study, frames, 1, 2)  # 2 frames of 8x4: ImagesInAcquisition may count frames
    multi.NumberOfFrames, multi.Columns = 2, 4
    _receive(ingest, multi)
    t0 = datetime.now(UTC)
    assert monitor.poll() == []
    assert {uid: st for uid, (st, _) in _series(ingest.engine).items()} == dict.fromkeys(
        (missing, differs, two_acq, short, frames), "receiving"
    )
    assert monitor.poll(t0 + timedelta(seconds=100)) == []  # quiet, but `short` still waits for its count
    got = _series(ingest.engine)
    assert [got[u] for u in (missing, differs, two_acq, frames)] == [("complete", "quiet")] * 4
    assert got[short] == ("receiving", None)
    (ev,) = monitor.poll(t0 + timedelta(seconds=201))
    assert ev.reason == "quiet" and ev.instance_count == 8
    assert _series(ingest.engine)[short] == ("complete", "quiet")


def test_counts_can_be_turned_off(db_url: str, make_settings: Any) -> None:
    settings, ingest = _setup(make_settings, db_url, images_in_acquisition=False)
    monitor = CompletionMonitor(ingest.engine, settings)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    _receive(ingest, _counted(study, series, 1, 1))
    assert monitor.poll() == []
    (ev,) = monitor.poll(datetime.now(UTC) + timedelta(seconds=61))
    assert ev.reason == "quiet"
