"""The peer launchers against the real programs: Orthanc, DCMTK storescp/storescu/echoscu."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
import pytest

from benchmarks.peers import OrthancServer, PeerError, StoreSCP, echo, free_port, split_evenly, storescu_send

pytestmark = [pytest.mark.dcmtk]


def _uids(files: list[Path]) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}


@pytest.mark.orthanc
def test_orthanc_stores_storescu_send_and_serves_rest_and_dicomweb(orthanc: OrthancServer, ct_files: list[Path]):
    assert echo(orthanc.host, orthanc.dicom_port, orthanc.aet)
    result = storescu_send(ct_files, orthanc.host, orthanc.dicom_port, orthanc.aet, associations=2)
    assert result.ok, result.output
    assert result.n_files == 4 and result.n_bytes == sum(p.stat().st_size for p in ct_files)
    assert result.instances_per_s > 0

    assert orthanc.count_instances() == 4
    assert len(orthanc.instances()) == 4
    study_uid = pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID
    assert set(orthanc.study_instances(study_uid)) == _uids(ct_files)
    assert orthanc.study_instances("1.2.3.999") == []
    ids = orthanc.study_instance_ids(study_uid)
    assert len(ids) == 4
    assert orthanc.instance_tags(ids[0])["Modality"] == "CT"
    stored = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(ids[0])))
    assert stored.SOPInstanceUID in _uids(ct_files)

    r = httpx.get(f"{orthanc.dicomweb_url}/studies", headers={"Accept": "application/dicom+json"}, timeout=10)
    assert r.status_code == 200
    assert [s["0020000D"]["Value"][0] for s in r.json()] == [study_uid]

    orthanc.delete_all()
    assert orthanc.count_instances() == 0


@pytest.mark.orthanc
def test_orthanc_kill_and_restart_keep_ports_and_storage(tmp_path: Path, ct_files: list[Path]):
    with OrthancServer(tmp_path / "o", aet="PACS", known_modalities={"gw": ("GW", "127.0.0.1", 4242)}) as o:
        ports = (o.dicom_port, o.http_port)
        assert storescu_send(ct_files[:2], o.host, o.dicom_port, "PACS").ok
        assert o.get("/modalities") == ["gw"]
        o.kill()
        assert not o.running
        assert not echo(o.host, o.dicom_port, "PACS", timeout=2)
        failed = storescu_send(ct_files[2:], o.host, o.dicom_port, "PACS")
        assert failed.rc != 0
        o.restart()
        assert (o.dicom_port, o.http_port) == ports
        assert o.count_instances() == 2
        assert (tmp_path / "o" / "orthanc.log").stat().st_size > 0
    assert not o.running


@pytest.mark.orthanc
def test_orthanc_start_failure_is_reported(tmp_path: Path):
    busy = OrthancServer(tmp_path / "a").start()
    try:
        clash = OrthancServer(tmp_path / "b", http_port=busy.http_port, startup_timeout=20)
        with pytest.raises(PeerError, match="Orthanc"):
            clash.start()
        assert not clash.running
    finally:
        busy.stop()


def test_storescp_receives_parallel_associations(storescp: StoreSCP, ct_files: list[Path]):
    result = storescu_send(ct_files, storescp.host, storescp.port, storescp.aet, associations=3)
    assert result.ok, result.output
    received = storescp.received_files()
    assert len(received) == 4
    assert _uids(received) == _uids(ct_files)
    storescp.clear()
    assert storescp.received_files() == []


def test_storescu_send_to_closed_port_fails(ct_files: list[Path]):
    result = storescu_send(ct_files, "127.0.0.1", free_port(), "NOBODY")
    assert result.rc != 0
    assert not result.ok


def test_storescu_send_accepts_a_directory(storescp: StoreSCP, ct_files: list[Path]):
    result = storescu_send(ct_files[0].parent, storescp.host, storescp.port, storescp.aet)
    assert result.ok and result.n_files == 4


def test_split_evenly():
    items = [Path(str(i)) for i in range(10)]
    chunks = split_evenly(items, 3)
    assert [len(c) for c in chunks] == [4, 3, 3]
    assert [p for c in chunks for p in c] == items
    assert len(split_evenly(items[:2], 8)) == 2


def test_storescp_started_twice_is_one_process_and_stop_ends_it(tmp_path: Path):
    """`with StoreSCP(...).start()` starts it twice: the second start must not launch another
    storescp on the same port (it fails to bind while the first answers C-ECHO, and the first
    then outlives stop())."""
    scp = StoreSCP(tmp_path / "scp")
    with scp.start() as again:
        first = scp._proc  # noqa: SLF001 - the process handle is what is under test
        assert again is scp and scp._proc is first and first is not None  # noqa: SLF001
        assert echo(scp.host, scp.port, scp.aet)
    assert first.poll() is not None  # stopped: no storescp left behind
    assert not echo(scp.host, scp.port, scp.aet, timeout=1)
    assert "Address already in use" not in scp.log_path.read_text()
