"""Alembic migrations of the index (run programmatically by dicom_node.db.init_db)."""
