"""Alembic environment: the connection comes from dicom_node.db.init_db (config.attributes).

The target metadata is the models' (dicom_node.db.schema_metadata), so `alembic revision
--autogenerate` writes the difference and tests/test_schema.py notices a drift between the
models and the migrations.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from dicom_node.db import schema_metadata

config = context.config
OPTIONS = {"target_metadata": schema_metadata(), "compare_type": True, "compare_server_default": True}


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        context.configure(connection=conn, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
