"""The console's research-batch pages: every batch with its progress by state, and each failure's
reason, without a patient identifier or study UID on the page."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.batch.conftest import IDENTITIES, make_archive
from tests.console.conftest import ADMIN, READER, login, make_app
from tests.jobs.conftest import write_config


def test_batches_page_shows_progress_and_failures_without_identifiers(tmp_path: Path) -> None:
    from dicom_node.batch.driver import BatchRequest, create_or_resume, enumerate_items
    from dicom_node.batch.execute import retry_or_fail, try_claim
    from dicom_node.batch.sources import FolderSource
    from dicom_node.config import load_config
    from dicom_node.console.auth import add_user
    from dicom_node.db import init_db, make_engine

    settings = load_config(
        write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    )
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    add_user(engine, *ADMIN, "admin")
    add_user(engine, *READER, "readonly")
    client = TestClient(make_app(settings))
    login(client, READER)
    assert "no research batch yet" in client.get("/batches").text

    studies = make_archive(tmp_path / "archive", n_cr=3, ct_slices=0, us=False)
    req = BatchRequest(source=str(tmp_path / "archive"), out_dir=tmp_path / "out", rules=[], max_attempts=1)
    batch, created = create_or_resume(engine, req, "tiny-test")
    assert created
    assert enumerate_items(engine, batch, FolderSource(tmp_path / "archive").studies(), max_attempts=1) == 3
    claim = try_claim(engine, 1, "w1")
    assert claim
    assert retry_or_fail(engine, claim, "the study has no decodable image") == "failed"

    page = client.get("/batches")
    assert page.status_code == 200
    text = page.text
    assert f'href="/batches/{batch.id}"' in text and "folder" in text
    assert "pending 2" in text and "failed 1" in text
    assert "the study has no decodable image (attempt 1)" in text
    one = client.get(f"/batches/{batch.id}")
    assert one.status_code == 200 and "the study has no decodable image" in one.text
    for page_text in (text, one.text):
        for identity in IDENTITIES:
            assert identity["PatientID"] not in page_text and identity["PatientName"] not in page_text
        for uid in studies:
            assert uid not in page_text
    assert client.get("/batches/999").status_code == 404
    assert TestClient(make_app(settings)).get("/batches", follow_redirects=False).status_code in (303, 401)
    engine.dispose()
