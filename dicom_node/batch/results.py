"""The results table (DIR/results.parquet + DIR/results.csv) and the progress summary of a batch.

One row per (study, series, task) from `batch_result`, plus one row per item that ended
without results (fetch failed, out of attempts), so every item is accounted for. UIDs are the
pseudonymous ones when the batch de-identifies (an item-level row then carries the study's
pseudonym, never the source UID). Both files are written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node.batch.deidentify import Deidentifier, DeidOptions
from dicom_node.batch.models import ACTIVE, DONE, FAILED, ITEM_STATES, SKIPPED, BatchItem, BatchResult, BatchRun
from dicom_node.jobs.settings import as_utc, utcnow

COLUMNS = [
    "batch_id",
    "item_id",
    "study_instance_uid",
    "series_instance_uid",
    "modality",
    "rule",
    "task",
    "state",
    "reason",
    "text",
    "questions",
    "answers",
    "segmentation_volume_ml",
    "segmentation_area_mm2_per_slice",
    "output_sop_instance_uids",
    "output_paths",
    "model_name",
    "model_version",
    "checkpoint_sha256",
    "fetch_seconds",
    "model_seconds",
    "write_seconds",
    "total_seconds",
]


def table_rows(engine: Engine, batch_id: int) -> list[dict[str, Any]]:
    with Session(engine) as s:
        batch = s.get(BatchRun, batch_id)
        if batch is None:
            raise KeyError(batch_id)
        results = s.exec(
            select(BatchResult)
            .where(BatchResult.batch_id == batch_id)
            .order_by(col(BatchResult.item_id), col(BatchResult.id))
        ).all()
        bare = s.exec(
            select(BatchItem)
            .where(BatchItem.batch_id == batch_id, col(BatchItem.state).in_([FAILED, SKIPPED]))
            .where(~col(BatchItem.id).in_(select(BatchResult.item_id).where(BatchResult.batch_id == batch_id)))
            .order_by(col(BatchItem.id))
        ).all()
    rows = [_result_row(r) for r in results]
    deid = DeidOptions.from_dict(batch.options.get("deidentify"))
    pseudo = Deidentifier(batch.options["secret"], deid) if deid.enabled else None
    for it in bare:
        uid = pseudo.pseudonyms(None, it.study_instance_uid)["study_instance_uid"] if pseudo else it.study_instance_uid
        t = it.timings or {}
        rows.append(
            {
                **dict.fromkeys(COLUMNS),
                "batch_id": batch_id,
                "item_id": it.id,
                "study_instance_uid": uid,
                "series_instance_uid": "",
                "task": "",
                "rule": "",
                "state": it.state,
                "reason": it.error,
                "output_sop_instance_uids": "[]",
                "output_paths": "[]",
                "fetch_seconds": t.get("fetch_s"),
            }
        )
    return rows


def _result_row(r: BatchResult) -> dict[str, Any]:
    vol = None
    areas: list[float] = []
    for sg in r.segmentation:
        if sg.get("volume_ml") is not None:
            vol = (vol or 0.0) + float(sg["volume_ml"])
        areas += sg.get("area_mm2_per_slice", [])
    t = r.timings or {}
    return {
        "batch_id": r.batch_id,
        "item_id": r.item_id,
        "study_instance_uid": r.study_instance_uid,
        "series_instance_uid": r.series_instance_uid,
        "modality": r.modality,
        "rule": r.rule,
        "task": r.task,
        "state": r.state,
        "reason": r.reason,
        "text": r.text,
        "questions": json.dumps([q["question"] for q in r.qa]) if r.qa else None,
        "answers": json.dumps([q["answer"] for q in r.qa]) if r.qa else None,
        "segmentation_volume_ml": vol,
        "segmentation_area_mm2_per_slice": json.dumps(areas) if areas else None,
        "output_sop_instance_uids": json.dumps(r.output_sop_instance_uids),
        "output_paths": json.dumps(r.output_paths),
        "model_name": r.model_name,
        "model_version": r.model_version,
        "checkpoint_sha256": r.checkpoint_sha256,
        "fetch_seconds": t.get("fetch_s"),
        "model_seconds": t.get("model_s"),
        "write_seconds": t.get("write_s"),
        "total_seconds": t.get("total_s"),
    }


def write_table(engine: Engine, batch_id: int, out_dir: Path) -> tuple[Path, Path, int]:
    """Write DIR/results.parquet and DIR/results.csv (atomically); returns their paths and the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = table_rows(engine, batch_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    types = {
        "batch_id": pa.int64(),
        "item_id": pa.int64(),
        "segmentation_volume_ml": pa.float64(),
        **{k: pa.float64() for k in ("fetch_seconds", "model_seconds", "write_seconds", "total_seconds")},
    }
    schema = pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=schema)
    parquet, csv_path = out_dir / "results.parquet", out_dir / "results.csv"
    tmp = out_dir / ".results.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, parquet)
    tmp = out_dir / ".results.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in COLUMNS})
    os.replace(tmp, csv_path)
    return parquet, csv_path, len(rows)


def batch_status(engine: Engine, batch_id: int | None = None, *, failures: int = 10) -> dict[str, Any]:
    """Progress of one batch (or the latest): counts per state, rate, ETA, failures with reasons.

    JSON-serialisable, without identifiers (items are named by id): the status page calls this.
    """
    with Session(engine) as s:
        q = select(BatchRun).order_by(col(BatchRun.id).desc())
        batch = s.get(BatchRun, batch_id) if batch_id is not None else s.exec(q).first()
        if batch is None:
            raise KeyError(batch_id)
        counts = dict.fromkeys(ITEM_STATES, 0)
        for state, n in s.exec(
            select(BatchItem.state, func.count()).where(BatchItem.batch_id == batch.id).group_by(BatchItem.state)
        ):
            counts[state] = n
        recent_cut = utcnow() - timedelta(minutes=10)
        first, recent = s.exec(
            select(func.min(BatchItem.finished_at), func.count()).where(
                BatchItem.batch_id == batch.id, col(BatchItem.finished_at) >= recent_cut
            )
        ).one()
        crashes = s.exec(
            select(func.coalesce(func.sum(BatchItem.crashes), 0)).where(BatchItem.batch_id == batch.id)
        ).one()
        failed = s.exec(
            select(BatchItem.id, BatchItem.attempts, BatchItem.error)
            .where(BatchItem.batch_id == batch.id, BatchItem.state == FAILED)
            .order_by(col(BatchItem.id))
            .limit(failures)
        ).all()
        failed_results = s.exec(
            select(BatchResult.item_id, BatchResult.task, BatchResult.reason)
            .where(BatchResult.batch_id == batch.id, BatchResult.state == FAILED)
            .limit(failures)
        ).all()
    finished = counts[DONE] + counts[FAILED] + counts[SKIPPED]
    active = sum(counts[s_] for s_ in ACTIVE)
    rate = None
    if recent and first is not None:
        span = max((utcnow() - as_utc(first)).total_seconds(), 1e-3)  # type: ignore[operator]
        rate = recent / span if recent > 1 else None
    return {
        "id": batch.id,
        "source_kind": _source_kind(batch.source),
        "state": batch.state,
        "total": batch.items_total,
        "finished": finished,
        "counts": counts,
        "active": active,
        "items_per_hour": round(rate * 3600, 1) if rate else None,
        "eta_seconds": round(active / rate, 1) if rate and active else (0.0 if not active else None),
        "deidentified": bool((batch.options.get("deidentify") or {}).get("enabled")),
        "created_at": as_utc(batch.created_at).isoformat() if batch.created_at else None,  # type: ignore[union-attr]
        "crashes": int(crashes or 0),
        "failures": [{"item": i, "attempts": a, "reason": e} for i, a, e in failed],
        "task_failures": [{"item": i, "task": t, "reason": r} for i, t, r in failed_results],
    }


def _source_kind(source: str) -> str:
    if source.startswith("dimse://"):
        return "dimse"
    if source.startswith(("http://", "https://")):
        return "dicomweb"
    return "folder"


def list_batches(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    with Session(engine) as s:
        ids = s.exec(select(BatchRun.id).order_by(col(BatchRun.id).desc()).limit(limit)).all()
    return [batch_status(engine, i, failures=3) for i in ids]
