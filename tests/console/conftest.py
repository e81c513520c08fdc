"""Fixtures for the console tests: one scenario study per session (real ingest, jobs, delivery),
users of both roles, an app client and a live server for the browser."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, require_tool
from tests.console.scenario import Scenario, build

ADMIN = ("alice", "admin-password-1")
READER = ("bob", "reader-password-1")


@pytest.fixture(scope="session")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    from benchmarks.peers import StoreSCP
    from dicom_node.console.auth import add_user
    from dicom_node.db import make_engine

    require_tool("storescp")
    tmp = tmp_path_factory.mktemp("console")
    with StoreSCP(tmp / "pacs", aet="PACS") as pacs:
        sc = build(tmp, ("PACS", pacs.port))
        assert len(pacs.received_files()) >= 1  # the SEG (and its TID 1500) reached the PACS
    engine = make_engine(sc.settings.database.url)
    add_user(engine, ADMIN[0], ADMIN[1], "admin")
    add_user(engine, READER[0], READER[1], "readonly")
    engine.dispose()
    yield sc


def make_app(settings: Any) -> Any:
    from dicom_node.api import create_app

    return create_app(settings)


def login(client: Any, user: tuple[str, str]) -> str:
    """Log in through the form; returns the session's CSRF token (read from a page)."""
    r = client.post("/login", data={"username": user[0], "password": user[1], "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/jobs").text
    marker = 'name="csrf_token" value="'
    assert marker in page
    return page.split(marker, 1)[1].split('"', 1)[0]


class LiveServer:
    """The console app under uvicorn in a thread, on a free port."""

    def __init__(self, settings: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(make_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("the console server did not start")

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(scenario: Scenario) -> Iterator[LiveServer]:
    with LiveServer(scenario.settings) as server:
        yield server


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    out = tmp_path / "screenshots"
    out.mkdir()
    return out
