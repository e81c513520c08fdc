"""Fixtures for the delivery tests: storage, databases (SQLite and PostgreSQL), Orthanc, settings."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from benchmarks.peers import OrthancServer
from tests.conftest import require_tool


@pytest.fixture
def storage(tmp_path: Path) -> Any:
    from dicom_node.storage import Storage

    return Storage(tmp_path / "storage", min_free_bytes=0)


def _engine(url: str) -> Engine:
    from dicom_node.db import init_db, make_engine

    init_db(url)
    return make_engine(url)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """Outbox database on both back-ends (parametrised by tests/conftest.py's db_url)."""
    eng = _engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """For tests where the back-end does not matter."""
    eng = _engine(f"sqlite:///{tmp_path / 'index.db'}")
    yield eng
    eng.dispose()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    require_tool("Orthanc")
    started: list[OrthancServer] = []

    def start(name: str = "orthanc", **kw: Any) -> OrthancServer:
        server = OrthancServer(tmp_path / name, **kw).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.kill()  # its storage is thrown away with tmp_path; a graceful stop takes seconds


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    return orthanc_factory()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def dimse_destination(server: OrthancServer, name: str = "pacs", **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "dimse",
        "ae_title": server.aet,
        "host": server.host,
        "port": server.dicom_port,
        "timeout_seconds": 10,
        **kw,
    }


def stow_destination(server: OrthancServer, name: str = "web", **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "dicomweb", "url": server.dicomweb_url, "timeout_seconds": 10, **kw}


def write_config(
    path: Path, *, db_url: str, storage_path: Path, destinations: list[dict[str, Any]], **export: Any
) -> Path:
    """A complete unimedvl.toml (the node's own format) with tiny backoff settings for tests."""
    policy = {"max_attempts": 3, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0, "poll_seconds": 0.05}
    policy.update(export)
    lines = [
        "[node]",
        'ae_title = "UNIMEDVL"',
        'host = "127.0.0.1"',
        "port = 11112",
        "[storage]",
        f"path = {_toml_value(storage_path)}",
        "[database]",
        f"url = {_toml_value(db_url)}",
        "[export]",
        *(f"{k} = {_toml_value(v)}" for k, v in policy.items()),
    ]
    for d in destinations:
        lines.append("[[destinations]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_settings(tmp_path: Path, storage: Any) -> Callable[..., Any]:
    """Settings through the node's real config loader: make_settings(engine, [destinations], **export)."""

    def make(engine: Engine, destinations: list[dict[str, Any]], **export: Any) -> Any:
        from dicom_node.config import load_config

        url = engine.url.render_as_string(hide_password=False)
        cfg = write_config(
            tmp_path / "unimedvl.toml",
            db_url=url,
            storage_path=tmp_path / "storage",
            destinations=destinations,
            **export,
        )
        return load_config(cfg)

    return make
