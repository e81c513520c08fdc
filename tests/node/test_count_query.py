"""Series counts from the sending PACS: Orthanc forwards a series to the node, the node asks
Orthanc (C-FIND, SERIES level) for Number of Series Related Instances and completes the series
when that many have arrived, not earlier and without waiting for the quiet period."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from sqlmodel import Session, select

from benchmarks.peers import OrthancServer
from dicom_node.completion import CompletionMonitor
from dicom_node.config import CountSourceSettings
from dicom_node.models import Series
from tests.conftest import free_port, require_tool
from tests.node.conftest import NODE_AET, make_ct


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    require_tool("Orthanc")
    started: list[OrthancServer] = []

    def start(**kw: Any) -> OrthancServer:
        server = OrthancServer(tmp_path / "orthanc", **kw).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.kill()


def _upload(pacs: OrthancServer, ds: Any) -> str:
    buf = DicomBytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    r = httpx.post(f"{pacs.url}/instances", content=buf.getvalue(), timeout=30)
    r.raise_for_status()
    return str(r.json()["ID"])


def _forward(pacs: OrthancServer, ids: list[str]) -> None:
    r = httpx.post(f"{pacs.url}/modalities/gw/store", json={"Resources": ids, "Synchronous": True}, timeout=60)
    r.raise_for_status()


def test_count_from_the_sending_pacs(
    tmp_path: Path, make_settings: Any, start_node: Any, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    port = free_port()
    pacs = orthanc_factory(
        known_modalities={"gw": (NODE_AET, "127.0.0.1", port)}, extra_config={"DicomAlwaysAllowFind": True}
    )
    settings = make_settings(
        f"sqlite:///{tmp_path / 'index.db'}",
        node={"port": port},
        completion={"study_quiet_seconds": 60, "series_quiet_seconds": 30, "force_complete_seconds": 3600},
    )
    source = CountSourceSettings(calling_ae=pacs.aet, ae_title=pacs.aet, host=pacs.host, port=pacs.dicom_port)
    settings = settings.model_copy(
        update={"completion": settings.completion.model_copy(update={"count_sources": [source]})}
    )
    node = start_node(settings, completion=False)
    monitor = CompletionMonitor(node.engine, settings)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ids = [_upload(pacs, make_ct(study, series, instance_number=i)) for i in range(3)]

    _forward(pacs, ids[:2])  # Orthanc holds 3; the node has 2 of them
    deadline = time.monotonic() + 20
    while True:
        with Session(node.engine) as s:
            row = s.exec(select(Series)).first()
        if row is not None and row.queried_instances is not None:
            break
        assert time.monotonic() < deadline, "no count stored from the PACS's C-FIND answer"
        time.sleep(0.05)
    assert (row.queried_instances, row.instance_count) == (3, 2)
    t0 = datetime.now(UTC)
    assert monitor.poll(t0 + timedelta(seconds=300)) == []  # paused past both quiet periods: held
    _forward(pacs, ids[2:])
    (ev,) = monitor.poll()
    assert (ev.reason, ev.instance_count) == ("count", 3)
