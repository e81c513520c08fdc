"""One batch item on a worker: claim, fetch into scratch, de-identify, plan, run, write, record.

Exactly once: the item is claimed with one conditional UPDATE (a token and a lease the worker
renews), outputs are written to fixed paths under the batch's DIR (fsync + atomic rename; the
study's folder is cleared first, so files of an attempt that died before recording are
replaced, never doubled), and the result rows are inserted in the same transaction that marks
the item done, only while this worker still holds the claim. A fetch error or an unexpected
exception puts the item back to "pending" (the driver re-publishes it after a back-off) until
`max_attempts`, then it ends "failed" with the reason. Scratch space is deleted afterwards.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy import func, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node.batch.deidentify import Deidentifier, DeidOptions, burned_in_reason, folder_token
from dicom_node.batch.models import (
    DONE,
    FAILED,
    FETCHING,
    PENDING,
    QUEUED,
    RUNNING,
    SKIPPED,
    BatchItem,
    BatchResult,
    BatchRun,
)
from dicom_node.batch.sources import SourceError, StudyRef, parse_source
from dicom_node.jobs.settings import as_utc, one_line, utcnow
from dicom_node.leases import LeaseKeeper
from dicom_node.routing import SeriesInfo, parse_rules, plan_study

log = logging.getLogger("dicom_node.batch.execute")

RUN_ITEM = "unimedvl.run_batch_item"
BATCH_QUEUE = "unimedvl.batch"


def worker_name() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ItemClaim:
    item: BatchItem
    batch: BatchRun
    token: str


def _claimable(now: Any) -> Any:
    return col(BatchItem.state).in_([PENDING, QUEUED]) | (
        col(BatchItem.state).in_([FETCHING, RUNNING]) & (col(BatchItem.lease_until) < now)  # type: ignore[operator]
    )


def try_claim(engine: Engine, item_id: int, worker: str, *, max_fetch: int = 0) -> ItemClaim | None | bool:
    """Claim the item for fetching. None: nothing to do (done, held elsewhere, out of attempts);
    False: claimable but all `max_fetch` retrieval slots of its batch are taken (try again)."""
    now = utcnow()
    token = uuid.uuid4().hex
    with Session(engine, expire_on_commit=False) as s:
        item = s.get(BatchItem, item_id)
        if item is None:
            log.warning("batch item %s is not in the database; message ignored", item_id)
            return None
        # Lock the batch row: the fetch-slot count and the claim are one decision (PostgreSQL;
        # SQLite's BEGIN IMMEDIATE already serialises writers).
        batch = s.exec(select(BatchRun).where(BatchRun.id == item.batch_id).with_for_update()).one()
        if max_fetch > 0:
            fetching = s.exec(
                select(func.count())
                .select_from(BatchItem)
                .where(
                    BatchItem.batch_id == batch.id,
                    BatchItem.state == FETCHING,
                    BatchItem.id != item_id,
                    col(BatchItem.lease_until) >= now,  # type: ignore[operator]
                )
            ).one()
            if fetching >= max_fetch:
                s.rollback()
                return False
        n = s.execute(
            update(BatchItem)
            .where(col(BatchItem.id) == item_id, col(BatchItem.attempts) < col(BatchItem.max_attempts), _claimable(now))
            .values(
                state=FETCHING,
                attempts=BatchItem.attempts + 1,
                lease_until=now + timedelta(seconds=item.lease_seconds),
                claim_token=token,
                worker=worker[:255],
                started_at=now,
                updated_at=now,
                error=None,
            )
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if not n:
            s.rollback()
            s.expire_all()
            item = s.get(BatchItem, item_id)
            assert item is not None
            if item.state in (PENDING, QUEUED) and item.attempts >= item.max_attempts:
                _finish(s, item_id, None, FAILED, f"gave up after {item.attempts} attempt(s): {item.error or ''}")
                s.commit()
            return None
        s.commit()
        s.expire_all()
        item = s.get(BatchItem, item_id)
        batch = s.get(BatchRun, item.batch_id)  # type: ignore[union-attr]
        assert item is not None and batch is not None
        s.expunge(item)
        s.expunge(batch)
        return ItemClaim(item, batch, token)


def claim(engine: Engine, item_id: int, worker: str, *, max_fetch: int = 0, wait_s: float = 3600.0) -> ItemClaim | None:
    """`try_claim`, waiting (bounded) for a retrieval slot of the batch's `--max-fetch` limit."""
    deadline = time.monotonic() + wait_s
    while True:
        got = try_claim(engine, item_id, worker, max_fetch=max_fetch)
        if got is not False:
            return got  # type: ignore[return-value]
        if time.monotonic() > deadline:
            log.warning("batch item %s: no retrieval slot within %.0f s; left for the driver", item_id, wait_s)
            return None
        time.sleep(0.2)


def _held(c: ItemClaim) -> Any:
    return (col(BatchItem.id) == c.item.id) & (col(BatchItem.claim_token) == c.token)


def set_state(engine: Engine, c: ItemClaim, state: str) -> bool:
    now = utcnow()
    with Session(engine) as s:
        n = s.execute(
            update(BatchItem)
            .where(_held(c), col(BatchItem.state).in_([FETCHING, RUNNING]))
            .values(state=state, updated_at=now, lease_until=now + timedelta(seconds=c.item.lease_seconds))
        ).rowcount  # type: ignore[attr-defined]
        s.commit()
    return bool(n)


def _finish(s: Session, item_id: int, token: str | None, state: str, reason: str | None, **values: Any) -> int:
    now = utcnow()
    q = update(BatchItem).where(col(BatchItem.id) == item_id)
    if token is not None:
        q = q.where(col(BatchItem.claim_token) == token, col(BatchItem.state).in_([FETCHING, RUNNING]))
    return s.execute(
        q.values(
            state=state,
            error=one_line(reason) if reason else None,
            updated_at=now,
            finished_at=now if state in (DONE, FAILED, SKIPPED) else None,
            lease_until=None,
            **values,
        )
    ).rowcount  # type: ignore[attr-defined]


def retry_or_fail(engine: Engine, c: ItemClaim, reason: str, *, crashed: bool = False) -> str:
    """Back to pending for another attempt (the driver re-publishes it), or failed when out of attempts.
    `crashed`: the attempt ended in an unexpected exception; counted in `BatchItem.crashes`."""
    state = FAILED if c.item.attempts >= c.item.max_attempts else PENDING
    extra: dict[str, Any] = {"crashes": BatchItem.crashes + 1} if crashed else {}
    with Session(engine) as s:
        _finish(
            s,
            c.item.id or 0,
            c.token,
            state,
            reason if state == PENDING else f"{reason} (attempt {c.item.attempts})",
            **extra,
        )
        s.commit()
    log.warning("batch item %s attempt %d: %s -> %s", c.item.id, c.item.attempts, reason, state)
    return state


def _renew_item_lease(engine: Engine, c: ItemClaim) -> int:
    """Extend the item's lease while the claim is still ours; 0 once it moved elsewhere (for LeaseKeeper)."""
    with Session(engine) as s:
        n = s.execute(
            update(BatchItem)
            .where(_held(c), col(BatchItem.state).in_([FETCHING, RUNNING]))
            .values(lease_until=utcnow() + timedelta(seconds=c.item.lease_seconds))
        ).rowcount  # type: ignore[attr-defined]
        s.commit()
    return n or 0


# --------------------------------------------------------------------------- the work


@dataclass
class ItemOutcome:
    """What processing one study gave: result rows (not yet recorded) and files written."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def state(self) -> str:
        if any(r["state"] == DONE for r in self.rows):
            return DONE
        if self.rows and all(r["state"] == SKIPPED for r in self.rows):
            return SKIPPED
        return FAILED if self.rows else SKIPPED


def read_datasets(files: Sequence[Path]) -> list[Dataset]:
    out = []
    for f in files:
        try:
            out.append(dcmread(f))
        except Exception as exc:
            raise SourceError(f"a fetched instance cannot be read ({type(exc).__name__})") from None
    return out


def _series_info(datasets: Sequence[Dataset]) -> SeriesInfo:
    d = datasets[0]
    return SeriesInfo(
        series_instance_uid=str(d.SeriesInstanceUID),
        modality=str(d.get("Modality", "") or ""),
        body_part=str(d.get("BodyPartExamined", "") or ""),
        series_description=str(d.get("SeriesDescription", "") or ""),
        sop_classes=tuple(sorted({str(x.SOPClassUID) for x in datasets})),
    )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _seg_measures(ds: Dataset) -> dict[str, Any]:
    """Area per frame (mm^2) and volume (ml) of a SEG, from its frames and pixel spacing."""
    import numpy as np

    try:
        frames = ds.pixel_array
        frames = frames.reshape((-1, *frames.shape[-2:]))
        shared = ds.SharedFunctionalGroupsSequence[0]
        pm = shared.PixelMeasuresSequence[0]
        dy, dx = (float(v) for v in pm.PixelSpacing)
        thickness = float(pm.get("SliceThickness", 0) or pm.get("SpacingBetweenSlices", 0) or 1.0)
        areas = [float(np.count_nonzero(f)) * dx * dy for f in frames]
        return {
            "area_mm2_per_slice": [round(a, 3) for a in areas],
            "volume_ml": round(sum(areas) * thickness / 1000, 4),
        }
    except Exception as exc:  # a measurement we cannot make is reported, not fatal
        return {"measure_error": type(exc).__name__}


def process_study(
    datasets: Sequence[Dataset],
    batch: BatchRun,
    engine: Any,
    *,
    out_dir: Path | None = None,
) -> ItemOutcome:
    """De-identify, plan with the batch's rules, run every task, write outputs under `out_dir`.

    Returns the result rows (one per (series, task), plus skipped series with their reason).
    Raises only for unexpected errors; a task's own input error is a failed row.
    """
    from inference.pipelines import PipelineError, run_task

    opts = batch.options
    deid = DeidOptions.from_dict(opts.get("deidentify"))
    outcome = ItemOutcome()
    by_series: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    skipped: list[tuple[list[Dataset], str]] = []
    deid_started = time.monotonic()
    if deid.enabled:
        deidentifier = Deidentifier(opts["secret"], deid)
        for uid in list(by_series):
            reason = next((r for r in map(burned_in_reason, by_series[uid]) if r), None)
            if reason and not deid.allow_burned_in:
                skipped.append((by_series.pop(uid), f"skipped: {reason} (use --allow-burned-in to include it)"))
        for group in [*by_series.values(), *(g for g, _ in skipped)]:
            for ds in group:
                deidentifier.apply(ds)
        by_series = {str(g[0].SeriesInstanceUID): g for g in by_series.values()}
    deid_s = time.monotonic() - deid_started
    any_ds = next(iter(by_series.values()), None) or (skipped[0][0] if skipped else list(datasets))
    study_uid = str(any_ds[0].get("StudyInstanceUID", ""))
    patient = str(any_ds[0].get("PatientID", "") or "")
    base = out_dir / f"P{folder_token(patient)}" / f"S{folder_token(study_uid)}" if out_dir else None
    if base is not None and base.exists():
        shutil.rmtree(base)  # files of an attempt that died before recording its results
    for group, reason in skipped:
        outcome.rows.append(_row(study_uid, group, "", "", SKIPPED, reason))
    infos = [_series_info(g) for g in by_series.values()]
    plan = plan_study(parse_rules(opts.get("rules")), infos)
    for uid in plan.unmatched_series:
        outcome.rows.append(_row(study_uid, by_series[uid], "", "", SKIPPED, "no rule matched this series"))
    model_s = write_s = 0.0
    for t_index, planned in enumerate(plan.tasks):
        kind = planned.task.kind
        sub = [ds for uid in planned.series for ds in by_series[uid]]
        started = time.monotonic()
        try:
            out = run_task(kind, sub, planned.task.parameters(), engine)
        except PipelineError as exc:
            for uid in planned.series:
                outcome.rows.append(_row(study_uid, by_series[uid], planned.rule, kind, FAILED, exc.reason))
            continue
        model_s += time.monotonic() - started
        started = time.monotonic()
        paths: dict[str, list[tuple[str, str]]] = {}
        for n, obj in enumerate(out.objects):
            series_key = obj.source_series_uid or "study"
            rel = f"{obj.kind}-{t_index:02d}-{n:03d}.dcm"
            if base is not None:
                path = base / f"R{folder_token(series_key)}" / rel
                _write_atomic(path, _encode(obj.dataset))
                outcome.files.append(path)
                rel = str(path.relative_to(out_dir))  # type: ignore[arg-type]
            paths.setdefault(series_key, []).append((obj.sop_instance_uid, rel))
            if obj.kind == "seg":
                for r in out.results:
                    if r.get("series_instance_uid") == obj.source_series_uid:
                        r.update(_seg_measures(obj.dataset))
        write_s += time.monotonic() - started
        info = dict(out.model)
        for uid in planned.series:
            res = [r for r in out.results if r.get("series_instance_uid") == uid]
            mine = paths.get(uid, []) + (paths.get("study", []) if uid == planned.series[0] else [])
            outcome.rows.append(
                _row(
                    study_uid,
                    by_series[uid],
                    planned.rule,
                    kind,
                    DONE,
                    None,
                    results=res,
                    outputs=mine,
                    model=info,
                )
            )
    outcome.timings = {"deid_s": round(deid_s, 4), "model_s": round(model_s, 4), "write_s": round(write_s, 4)}
    return outcome


def _row(
    study_uid: str,
    group: Sequence[Dataset],
    rule: str,
    task: str,
    state: str,
    reason: str | None,
    *,
    results: Sequence[dict[str, Any]] = (),
    outputs: Sequence[tuple[str, str]] = (),
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    d = group[0]
    text_parts, qa, seg = [], [], []
    for r in results:
        if r.get("findings") or r.get("impression"):
            text_parts.append(f"Findings: {r.get('findings', '')}\nImpression: {r.get('impression', '')}".strip())
        qa += list(r.get("qa", []))
        if "segments" in r:
            seg.append({k: r[k] for k in ("segments", "area_mm2_per_slice", "volume_ml", "measure_error") if k in r})
    text = "\n".join(text_parts) or ("\n".join(f"Q: {x['question']} A: {x['answer']}" for x in qa) or None)
    model = model or {}
    return {
        "study_instance_uid": study_uid,
        "series_instance_uid": str(d.get("SeriesInstanceUID", "")),
        "modality": str(d.get("Modality", "") or "")[:16] or None,
        "rule": rule,
        "task": task,
        "state": state,
        "reason": reason,
        "text": text,
        "qa": qa,
        "segmentation": seg,
        "output_sop_instance_uids": [u for u, _ in outputs],
        "output_paths": [p for _, p in outputs],
        "model_name": model.get("model_name"),
        "model_version": model.get("version"),
        "checkpoint_sha256": model.get("checkpoint_sha256"),
    }


def record(engine: Engine, c: ItemClaim, outcome: ItemOutcome, timings: dict[str, float], storage: Any = None) -> bool:
    """Insert the result rows and finish the item in one transaction, only while the claim holds.

    With `--send DEST` the output objects are also queued in the gateway's outbox (same
    transaction; the exporter of `unimedvl serve`/`node` delivers them, idempotent per SOP
    Instance UID and destination).
    """
    now = utcnow()
    send = list(c.batch.options.get("send") or [])
    with Session(engine) as s:
        item = s.exec(select(BatchItem).where(BatchItem.id == c.item.id).with_for_update()).one()
        if item.claim_token != c.token or item.state not in (FETCHING, RUNNING):
            s.rollback()
            return False
        if send and storage is None:
            log.warning(
                "batch item %s: outputs not queued for %s: a worker without the node's storage path "
                "([worker] node_url) cannot queue batch outputs for delivery",
                item.id,
                ", ".join(send),
            )
        if send and storage is not None:
            from dicom_node.export.outbox import enqueue

            for f in outcome.files:
                enqueue(s, storage, f.read_bytes(), send, now=now)
        for r in outcome.rows:
            s.add(BatchResult(batch_id=c.batch.id or 0, item_id=item.id or 0, timings=timings, created_at=now, **r))
        reason = None
        if outcome.state == SKIPPED:
            reason = "; ".join(sorted({r["reason"] for r in outcome.rows if r["reason"]})) or "no series to run"
        elif outcome.state == FAILED:
            reason = "; ".join(sorted({r["reason"] for r in outcome.rows if r["reason"]}))
        _finish(s, item.id or 0, c.token, outcome.state, reason, timings=timings)
        s.commit()
    return True


def scratch_root(batch: BatchRun) -> Path | None:
    root = batch.options.get("scratch_dir")
    return Path(root) if root else None


def run_item(db: Engine, model: Any, item_id: int, *, worker: str | None = None, storage: Any = None) -> str:
    """Claim and run one item end to end (the Celery task's body); returns the item's new state
    or "skipped-message" when there was nothing to do. `model()` returns the warm engine."""
    with Session(db) as s:
        item = s.get(BatchItem, item_id)
        batch = s.get(BatchRun, item.batch_id) if item is not None else None
    max_fetch = int(batch.options.get("max_fetch", 0) or 0) if batch is not None else 0
    c = claim(db, item_id, worker or worker_name(), max_fetch=max_fetch)
    if c is None:
        return "skipped-message"
    source = parse_source(c.batch.source, c.batch.options)
    scratch: Path | None = None
    try:
        with LeaseKeeper(
            lambda: _renew_item_lease(db, c),
            c.item.lease_seconds,
            name=f"batch item {c.item.id}",
            stop_when_lost=True,
            min_interval=0.2,
        ) as hb:
            started = time.monotonic()
            ref = StudyRef(c.item.study_instance_uid, c.item.patient_id, dict(c.item.locator))
            if not source.local:
                root = scratch_root(c.batch)
                if root is not None:
                    root.mkdir(parents=True, exist_ok=True)
                scratch = Path(tempfile.mkdtemp(prefix=f"unimedvl-batch-{item_id}-", dir=root))
            try:
                files = source.fetch(ref, scratch or Path("."))
                datasets = read_datasets(files)
            except SourceError as exc:
                return retry_or_fail(db, c, exc.reason)
            fetch_s = time.monotonic() - started
            state_started = time.monotonic()
            if not set_state(db, c, RUNNING):
                return "lost"
            state_s = time.monotonic() - state_started
            outcome = process_study(datasets, c.batch, model(), out_dir=Path(c.batch.out_dir))
            if hb.lost.is_set():
                return "lost"
            timings = {
                "fetch_s": round(fetch_s, 4),
                "state_s": round(state_s, 4),
                **outcome.timings,
                "total_s": round(time.monotonic() - started, 4),
            }
            if not record(db, c, outcome, timings, storage):
                log.warning("batch item %s: claim lost before recording; another attempt owns it", item_id)
                return "lost"
            log.info(
                "batch item %s %s: %d result row(s), %d file(s)",
                item_id,
                outcome.state,
                len(outcome.rows),
                len(outcome.files),
            )
            return outcome.state
    except Exception as exc:
        from dicom_node.jobs.runner import failure_reason

        log.error("batch item %s failed unexpectedly: %s\n%s", item_id, failure_reason(exc), traceback.format_exc())
        return retry_or_fail(db, c, failure_reason(exc), crashed=True)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def lease_expired(item: BatchItem) -> bool:
    lease = as_utc(item.lease_until)
    return lease is not None and lease < utcnow()
