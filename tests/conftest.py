"""Shared fixtures: free ports, the machine's PostgreSQL and RabbitMQ, tool lookups.

Area-specific fixtures live in each test folder's own conftest.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("UNIMEDVL_TEST_PG", "postgresql://root@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("UNIMEDVL_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


# ------------------------------------------------------------------ markers that say what a test uses
# A test that uses a real component carries its marker, so `-m "not orthanc"` (etc.) leaves out
# exactly the tests that need it. Fixtures mark their users at collection; a test that reaches a
# component another way (require_tool, a parameter resolved at run time) without the marker fails.
FIXTURE_MARKERS = {
    "pg_server": "postgres",
    "pg_url": "postgres",
    "amqp_url": "rabbitmq",
    "rabbit_vhost": "rabbitmq",
    "orthanc": "orthanc",
    "orthanc_factory": "orthanc",
    "storescp": "dcmtk",
    "validators": "dcmtk",  # tests/pipelines: dciodvfy + dsrdump
    "tools": "dcmtk",  # tests/sr/test_validators.py: dciodvfy + dsrdump
    "scenario": "dcmtk",  # tests/console: a storescp PACS receives the demo outputs
}
TOOL_MARKERS = {
    "Orthanc": "orthanc",
    "rabbitmqctl": "rabbitmq",
    # DCMTK, and dicom3tools under the same marker (both are the "DICOM command-line tools")
    **dict.fromkeys(("storescu", "storescp", "echoscu", "findscu", "dcmdump", "dsrdump", "dcmodify"), "dcmtk"),
    **dict.fromkeys(("dciodvfy", "dcentvfy"), "dcmtk"),
}
_current: pytest.Item | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            marker = FIXTURE_MARKERS.get(name)
            if marker and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _current
    _current = item


def pytest_runtest_teardown(item: pytest.Item) -> None:
    global _current
    _current = None


def require_marker(marker: str, what: str) -> None:
    """Fail the running test when it uses `what` without carrying `marker`."""
    item = _current
    if item is not None and item.get_closest_marker(marker) is None:
        pytest.fail(
            f"{item.nodeid} uses {what} but is not marked {marker!r}: add @pytest.mark.{marker} "
            f'(so that -m "not {marker}" leaves it out)',
            pytrace=False,
        )


def require_tool(name: str) -> str:
    """The path of a command-line tool the running test needs (it must carry the tool's marker)."""
    if name in TOOL_MARKERS:
        require_marker(TOOL_MARKERS[name], name)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh (it installs DCMTK, dicom3tools, Orthanc)")
    return path


def _ensure_services() -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "services.sh")], check=False, timeout=120)


@pytest.fixture(scope="session")
def pg_server() -> str:
    """Admin URL of the machine's PostgreSQL, started if it had stopped."""
    import psycopg

    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError:
        _ensure_services()
        psycopg.connect(PG_ADMIN_URL, connect_timeout=10).close()
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (SQLAlchemy URL), dropped afterwards."""
    import psycopg

    require_marker("postgres", "PostgreSQL")
    name = f"unimedvl_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """URL of the machine's RabbitMQ, started if it had stopped."""
    import kombu

    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as c:
            c.connect()
    except Exception:
        _ensure_services()
        with kombu.Connection(AMQP_URL, connect_timeout=30) as c:
            c.connect()
    return AMQP_URL


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both database back-ends: embedded SQLite and the machine's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return request.getfixturevalue("pg_url")
