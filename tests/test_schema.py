"""The migrated database matches the models: `upgrade head`, then Alembic's autogenerate
comparison finds no difference (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import BigInteger, Column, Index, MetaData, Table, inspect

from dicom_node.db import alembic_config, current_revision, init_db, make_engine, schema_metadata


def _differences(url: str, metadata: MetaData) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(ctx, metadata)
    finally:
        engine.dispose()


def test_upgrade_head_gives_the_models_schema(db_url: str) -> None:
    init_db(db_url)
    assert current_revision(db_url) is not None
    assert _differences(db_url, schema_metadata()) == []


def test_alembic_check_through_our_env_finds_nothing_to_generate(db_url: str) -> None:
    """`alembic check` runs migrations/env.py: it needs the models as target metadata (it refused
    to run while env.py passed None) and raises when autogenerate would write a migration."""
    init_db(db_url)
    command.check(alembic_config(db_url))


def _kinds(diffs: list) -> list[str]:
    # compare_metadata gives tuples, or lists of tuples for column modifications.
    return sorted(d[0] if isinstance(d, tuple) else d[0][0] for d in diffs)


def _drift(kind: str) -> MetaData:
    md = MetaData()
    for table in schema_metadata().sorted_tables:
        table.to_metadata(md)
    job = md.tables["job"]
    if kind == "column":
        job.append_column(Column("priority", BigInteger, nullable=True))
    elif kind == "index":
        Index("ix_job_worker_kind", job.c.worker, job.c.kind)
    elif kind == "table":
        Table("job_note", md, Column("id", BigInteger, primary_key=True))
    elif kind == "type":
        job.c.kind.type = BigInteger()
    return md


@pytest.mark.parametrize(
    ("drift", "expected"),
    [("column", ["add_column"]), ("index", ["add_index"]), ("table", ["add_table"]), ("type", ["modify_type"])],
)
def test_the_comparison_sees_each_kind_of_drift(db_url: str, drift: str, expected: list[str]) -> None:
    """What `target_metadata=None` hid: a model change the migrations lack is reported."""
    init_db(db_url)
    assert _kinds(_differences(db_url, _drift(drift))) == expected


def test_the_models_know_every_table_the_migrations_create(db_url: str) -> None:
    init_db(db_url)
    engine = make_engine(db_url)
    try:
        live = set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()
    assert live == set(schema_metadata().tables)
    assert {"instance", "job", "outbox"} <= live
