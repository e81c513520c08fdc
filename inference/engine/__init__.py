"""Pure PyTorch UniMedVL engine (no DICOM, no database, no Celery)."""
