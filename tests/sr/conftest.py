"""Fixtures for the sr_writers tests."""

from __future__ import annotations

import pytest

from sr_writers import Provenance


@pytest.fixture
def provenance() -> Provenance:
    return Provenance(
        model_name="UniMedVL",
        model_version="1.0.0",
        checkpoint_hash="9f2c4e1a7b3d5f60" + "0" * 48,
        software_versions=("unimedvl-gateway 0.1.0",),
        institution_name="Klinikum Süd",
    )
