"""Orthanc as the source archive: C-FIND, C-GET, C-MOVE to our AE, QIDO-RS + WADO-RS; a study
that cannot be fetched; the PACS stopped and back; the de-identified DICOMweb batch end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from dicom_node.batch.sources import DicomWebSource, DimseSource, SourceError, StudyRef
from tests.batch.conftest import FAST_TASKS, identifying_values, make_archive, run_cli
from tests.conftest import REPO, free_port, require_tool
from tests.jobs.conftest import wait_for, write_config

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[Any, dict[str, list[Path]], int]]:
    from benchmarks.peers import OrthancServer

    require_tool("Orthanc")
    move_port = free_port()
    server = OrthancServer(
        tmp_path / "orthanc", dicomweb=True, known_modalities={"unimedvl": ("UNIMEDVL", "127.0.0.1", move_port)}
    ).start()
    studies = make_archive(tmp_path / "archive", n_cr=2, ct_slices=2, us=False)
    for paths in studies.values():
        for p in paths:
            httpx.post(f"{server.url}/instances", content=p.read_bytes(), timeout=30).raise_for_status()
    try:
        yield server, studies, move_port
    finally:
        server.kill()


def test_dimse_and_dicomweb_list_and_fetch(pacs: Any, tmp_path: Path) -> None:
    server, studies, move_port = pacs
    ct_uid = next(u for u, ps in studies.items() if dcmread(ps[0]).Modality == "CT")
    dimse = DimseSource("ORTHANC", "127.0.0.1", server.dicom_port, {}, move_port=move_port, timeout=10)
    assert {r.study_instance_uid for r in dimse.studies()} == set(studies)
    only_ct = DimseSource("ORTHANC", "127.0.0.1", server.dicom_port, {"ModalitiesInStudy": "CT"}, timeout=10)
    assert [r.study_instance_uid for r in only_ct.studies()] == [ct_uid]
    web = DicomWebSource(server.dicomweb_url, {})
    listed = list(web.studies())
    assert {r.study_instance_uid for r in listed} == set(studies) and all(r.patient_id for r in listed)
    want = sorted(str(dcmread(p).SOPInstanceUID) for p in studies[ct_uid])
    for how, source in [("get", dimse), ("move", DimseSource(**{**vars(dimse), "retrieve": "move"})), ("wado", web)]:
        scratch = tmp_path / how
        scratch.mkdir()
        files = source.fetch(StudyRef(ct_uid), scratch)
        assert sorted(str(dcmread(f).SOPInstanceUID) for f in files) == want, how
        assert all(f.parent == scratch and f.name.endswith(".dcm") for f in files)  # names we generate
    unknown = StudyRef("1.2.3.4.5.6.7.8.9")
    for source in (dimse, web):
        with pytest.raises(SourceError) as err:
            source.fetch(unknown, tmp_path)
        assert "1.2.3.4.5.6.7.8.9" not in err.value.reason  # UIDs identify: never in a reason
    server.kill()
    for source in (dimse, web):
        with pytest.raises(SourceError):
            list(source.studies())


def test_deidentified_report_and_vqa_batch_over_dicomweb(pacs: Any, tmp_path: Path) -> None:
    """The README's one command: a de-identified report + VQA batch over the studies in Orthanc."""
    server, studies, _ = pacs
    cfg = write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    out = tmp_path / "out"
    scratch = tmp_path / "scratch"
    args = ["batch", server.dicomweb_url, "--out", str(out), *FAST_TASKS, "--scratch", str(scratch)]
    r = run_cli([*args, "--json-progress", "-c", str(cfg)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted((row["task"], row["state"]) for row in table) == [("report", "done")] * 3 + [("vqa", "done")] * 3
    secrets = identifying_values([p for ps in studies.values() for p in ps])
    outputs = list(out.rglob("*.dcm"))
    assert len(outputs) == 6
    for f in [*outputs, out / "results.csv", out / "results.parquet"]:
        data = f.read_bytes()
        assert not [v for v in secrets if v.encode() in data], f
    assert scratch.is_dir() and not list(scratch.iterdir())  # each fetched study deleted after its run


def test_uid_list_with_a_missing_study_and_the_pacs_stopped_and_back(pacs: Any, tmp_path: Path) -> None:
    server, studies, _ = pacs
    known = list(studies)[:2]
    uids = tmp_path / "studies.csv"
    uids.write_text("StudyInstanceUID,note\n" + "".join(f"{u},x\n" for u in known) + "1.2.826.0.1.999.1,gone\n")
    db_url = f"sqlite:///{tmp_path / 'index.db'}"
    cfg = write_config(tmp_path, db_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    server.kill()  # the PACS is down when the batch starts
    args = ["batch", str(uids), "--fetch-from", f"dimse://ORTHANC@127.0.0.1:{server.dicom_port}", "--out"]
    args += [str(tmp_path / "out"), "--task", "report", "--max-new-tokens", "2", "--max-attempts", "6"]
    args += ["--retry-backoff", "0.5", "--json-progress", "-c", str(cfg)]
    log = tmp_path / "batch.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", *args],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:

        def failed_once() -> bool:
            eng = create_engine(db_url)
            try:
                with eng.connect() as c:
                    return bool(
                        c.execute(
                            text("SELECT count(*) FROM batch_item WHERE attempts >= 1 AND error IS NOT NULL")
                        ).scalar()
                    )
            except Exception:
                return False
            finally:
                eng.dispose()

        wait_for(failed_once, 240, "a fetch failing while the PACS is down", log.read_text)
        server.restart()
        assert proc.wait(400) == 1, log.read_text()[-4000:]  # 1: some item failed
    finally:
        if proc.poll() is None:
            proc.kill()
    eng = create_engine(db_url)
    with eng.connect() as c:
        items = c.execute(text("SELECT study_instance_uid, state, attempts, error FROM batch_item")).all()
    eng.dispose()
    by_uid = {u: (s, a, e) for u, s, a, e in items}
    assert all(by_uid[u][0] == "done" for u in known), items
    assert any(by_uid[u][1] >= 2 for u in known)  # retried across the outage
    state, attempts, error = by_uid["1.2.826.0.1.999.1"]
    assert state == "failed" and attempts == 6 and "C-GET" in error, items
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    failed = [row for row in table if row["state"] == "failed"]
    assert len(failed) == 1 and "C-GET" in failed[0]["reason"]
    status = run_cli(["batch", "status", "-c", str(cfg)], timeout=60)
    assert "C-GET" in status.stdout and "failed" in status.stdout, status.stdout
