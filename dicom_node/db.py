"""Database engine, migrations and sessions for the index (SQLite default, PostgreSQL by URL).

SQLite runs in WAL mode with synchronous=FULL: an instance is acknowledged only after its row
is committed, and with NORMAL a power cut could drop the last commits after the peer got
0x0000. Write transactions start with BEGIN IMMEDIATE so concurrent writers (listener
threads, listener processes, the completion monitor) queue on busy_timeout instead of failing
with "database is locked" when a read transaction tries to upgrade.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, SQLModel, col, create_engine, select

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_url(url: str) -> str:
    """postgresql:// and postgres:// mean psycopg 3 here (psycopg2 is not installed)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, **kw: Any) -> Engine:
    url = normalise_url(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}, **kw
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" hook issue BEGIN itself
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # engine.execution_options(readonly=True) gives a deferred BEGIN for pure reads.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("readonly") else "BEGIN IMMEDIATE")

        return engine
    kw.setdefault("pool_pre_ping", True)  # survive PostgreSQL restarts
    kw.setdefault("pool_size", 5)
    kw.setdefault("max_overflow", 20)
    return create_engine(url, **kw)


def schema_metadata() -> MetaData:
    """The tables the migrations must produce: every SQLModel table of the index, jobs, outbox and batches.

    Alembic's target metadata (migrations/env.py), and what tests/test_schema.py compares the
    migrated database with.
    """
    import dicom_node.batch.models  # noqa: F401  (each import registers its tables)
    import dicom_node.console.models  # noqa: F401
    import dicom_node.export.models  # noqa: F401
    import dicom_node.jobs.models  # noqa: F401
    import dicom_node.models  # noqa: F401

    return SQLModel.metadata


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def init_db(url: str, revision: str = "head") -> None:
    """Create or upgrade the schema (Alembic `upgrade head`); safe to run on every start."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            from alembic.runtime.migration import MigrationContext

            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def newest_page(model: Any, *, limit: int, offset: int = 0, **equal: Any) -> Any:
    """SELECT of `model` rows, newest (highest id) first, one page; `column=value` filters for the
    values given (None or "" means no filter). For the listings of the CLI and the status API."""
    query = select(model)
    for name, value in equal.items():
        if value not in (None, ""):
            query = query.where(getattr(model, name) == value)
    return query.order_by(col(model.id).desc()).offset(offset).limit(limit)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session committed on success and rolled back on error."""
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
