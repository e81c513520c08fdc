"""A bug while a batch item runs (not bad input) is logged with its traceback, retried, counted
per item and in the `unimedvl_batch_item_crashes` metric, and reads "internal error"."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import Session, select

from tests.batch.conftest import make_archive


def test_a_bug_in_a_batch_item_is_a_crash_retried_counted_and_internal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import inference.preprocess as preprocess
    from dicom_node.batch.driver import BatchRequest, create_or_resume, enumerate_items
    from dicom_node.batch.execute import run_item
    from dicom_node.batch.metrics import BatchCollector
    from dicom_node.batch.models import FAILED, PENDING, BatchItem
    from dicom_node.batch.results import batch_status
    from dicom_node.batch.sources import FolderSource
    from dicom_node.db import init_db, make_engine
    from inference.engine.api import load_engine

    db_url = f"sqlite:///{tmp_path / 'index.db'}"
    init_db(db_url)
    db = make_engine(db_url)
    root = tmp_path / "archive"
    make_archive(root, n_cr=0, ct_slices=2, us=False)
    rules = [{"name": "b", "match": {}, "tasks": [{"kind": "report", "max_new_tokens": 2, "slices": "all"}]}]
    batch, _ = create_or_resume(db, BatchRequest(source=str(root), out_dir=tmp_path / "out", rules=rules), "tiny")
    assert enumerate_items(db, batch, FolderSource(root).studies(), max_attempts=2) == 1

    def broadcast_bug(frame: np.ndarray, window: Any, function: str = "LINEAR") -> np.ndarray:
        return (frame + np.zeros(frame.shape[0] + 1)).astype(np.uint8)  # ValueError: shapes differ

    monkeypatch.setattr(preprocess, "apply_window", broadcast_bug)
    engine = load_engine("tiny", parts="understanding")
    with caplog.at_level(logging.ERROR, logger="dicom_node.batch.execute"):
        assert run_item(db, lambda: engine, 1, worker="w1") == PENDING  # retried
        assert run_item(db, lambda: engine, 1, worker="w1") == FAILED  # out of attempts
    with Session(db) as s:
        item = s.exec(select(BatchItem)).one()
    assert item.crashes == 2 and item.state == FAILED
    assert (item.error or "").startswith("internal error (ValueError)"), item.error
    assert "broadcast" not in (item.error or "")
    crashed = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(crashed) == 2 and all("Traceback" in r.getMessage() for r in crashed)
    metrics = {m.name: m for m in BatchCollector(db).collect()}
    assert metrics["unimedvl_batch_item_crashes"].samples[0].value == 2
    assert {s.labels["state"]: s.value for s in metrics["unimedvl_batch_items"].samples}[FAILED] == 1
    assert batch_status(db, batch.id)["crashes"] == 2
    db.dispose()
