"""Site validation: the model against a site's own labels held in DICOM, through the gateway's pipelines.

A folder (searched recursively) holding the studies' images and the labels:

* reference **SEG** objects (BINARY or FRACTIONAL, single-frame sources): each segment is run as a
  ``segment`` task (target = the segment's label, every slice of the referenced series) and scored with
  Dice over the volume and HD95 in mm, using the source geometry (pixel spacing, slice spacing along the
  normal);
* radiologists' reports as **SR** documents (every TEXT item, in document order) or as ``reports.csv``
  (columns ``study``, ``report``): a ``report`` task on the study's first image series, scored with
  ROUGE-L per report and BLEU-1..4 over the set;
* ``vqa.csv`` (columns ``study``, ``question``, ``answer``): a ``vqa`` task per study, scored like
  VQA-RAD (yes/no answers closed, others open).

``study`` is the StudyInstanceUID. SR objects whose SeriesDescription carries "AI" are our own outputs
and are not references. The same records and summary as the benchmarks are written; no patient
identifier reaches a log line (items are logged by number).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from .answers import is_yes_no
from .items import DatasetError, sha256_file
from .report import build_summary, write_summary
from .runner import PREDICTIONS, RUN_META, Clock, EvalEngine, Settings
from .scoring import save_mask, score_record

log = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
IMAGE_MODALITIES_EXCLUDED = {"SR", "SEG", "KO", "PR", "RTSTRUCT", "DOC"}


class SiteFolder:
    """The DICOM objects of a site folder, indexed by study and series (pixel data read lazily)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.series: dict[str, list[Path]] = defaultdict(list)  # image series -> files
        self.study_series: dict[str, dict[str, Dataset]] = defaultdict(dict)  # study -> series -> header
        self.segs: list[Path] = []
        self.srs: list[Path] = []
        self.files: list[Path] = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if path.suffix.lower() in (".csv", ".txt", ".md", ".json"):
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError):
                log.info("site folder: skipping a file that is not DICOM")
                continue
            self.files.append(path)
            modality = str(ds.get("Modality", "")).upper()
            if str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS:
                self.segs.append(path)
            elif modality == "SR":
                if "AI" not in str(ds.get("SeriesDescription", "")).split():
                    self.srs.append(path)
            elif modality not in IMAGE_MODALITIES_EXCLUDED and "Rows" in ds:
                self.series[str(ds.SeriesInstanceUID)].append(path)
                self.study_series[str(ds.StudyInstanceUID)].setdefault(str(ds.SeriesInstanceUID), ds)

    def series_datasets(self, series_uid: str, where: Path) -> list[Dataset]:
        if series_uid not in self.series:
            raise DatasetError(f"{where}: refers to series {series_uid}, which is not in {self.root}")
        return [dcmread(p) for p in self.series[series_uid]]

    def first_series(self, study_uid: str, where: str) -> str:
        found = self.study_series.get(study_uid)
        if not found:
            raise DatasetError(f"{where}: study {study_uid} has no image series in {self.root}")
        return min(found, key=lambda s: (int(found[s].get("SeriesNumber", 0) or 0), s))


def _rows(path: Path, need: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV ({exc})") from exc
    if not rows or not set(need) <= set(rows[0]):
        raise DatasetError(f"{path}: expected a header with the columns {', '.join(need)} and at least one row")
    for n, r in enumerate(rows, 2):
        for k in need:
            if not str(r.get(k) or "").strip():
                raise DatasetError(f"{path}: line {n} has an empty {k!r}")
    return rows


_CONTEXT = {"HAS OBS CONTEXT", "HAS ACQ CONTEXT", "HAS CONCEPT MOD"}


def sr_text(ds: Dataset) -> str:
    """The TEXT content items of an SR document that are report content (observer / acquisition context and
    concept modifiers left out), depth first, joined by spaces."""
    out: list[str] = []

    def walk(items: Any) -> None:
        for it in items or []:
            if str(it.get("RelationshipType", "")) in _CONTEXT:
                continue
            if it.get("ValueType") == "TEXT" and str(it.get("TextValue", "")).strip():
                out.append(str(it.TextValue).strip())
            walk(it.get("ContentSequence"))

    walk(ds.get("ContentSequence"))
    return " ".join(out)


def _attempt(clock: Clock, fn: Callable[[], Any], n: int) -> tuple[Any, str | None]:
    """Run one pipeline call; a PipelineError / ValueError (input the pipeline refuses) fails the item
    with its reason, anything else is logged with its traceback, retried once, then fails the item."""
    from inference.pipelines import PipelineError

    error = None
    for attempt in (1, 2):
        try:
            return clock.run(fn), None
        except (PipelineError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
        except Exception as exc:
            log.exception("site item %d failed (attempt %d)", n, attempt)
            error = f"{type(exc).__name__}: {exc}"
    return None, error


def _seg_masks(seg: Any, segment: int, sop_uids: list[str]) -> np.ndarray:
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_uids, segment_numbers=[segment], assert_missing_frames_are_empty=True
    )
    return np.asarray(arr[..., 0]) > 0


def _segment_records(folder: SiteFolder, engine: EvalEngine, s: Settings, clock: Clock, out: Path) -> list[dict]:
    import highdicom as hd

    from inference.pipelines import run_task
    from sr_writers.geometry import source_geometry

    records = []
    for path in folder.segs:
        try:
            ref = hd.seg.segread(path)
        except Exception as exc:
            raise DatasetError(f"{path}: not a readable SEG ({exc})") from exc
        series_uids = {str(s[1]) for s in ref.get_source_image_uids()}
        if len(series_uids) != 1:
            raise DatasetError(f"{path}: references {len(series_uids)} series; one source series is supported")
        sources = folder.series_datasets(series_uids.pop(), path)
        geom = source_geometry(sources)
        if geom.multiframe:
            raise DatasetError(f"{path}: multi-frame sources are not supported for site validation yet")
        sops = [str(d.SOPInstanceUID) for d in geom.datasets]
        spacing = (geom.slice_spacing or geom.frames[0].slice_thickness or 1.0, *geom.frames[0].pixel_spacing)
        for seg_desc in ref.SegmentSequence:
            number, label = int(seg_desc.SegmentNumber), str(seg_desc.SegmentLabel)
            params = {"targets": [{"label": label}], "slices": "all", "steps": s.steps, "seed": s.seed}
            n = len(records)
            rec: dict[str, Any] = {"id": f"{ref.SeriesInstanceUID}/{number}", "task": "segment",
                                   "prompt": f"Segment the {label}.", "target": label,
                                   "spacing_mm": [float(v) for v in spacing]}  # fmt: skip
            truth = _seg_masks(ref, number, sops)
            result, rec["error"] = _attempt(clock, lambda d=sources, p=params: run_task("segment", d, p, engine), n)
            if result is not None:
                pred_seg = next(o.dataset for o in result.objects if o.kind == "seg")
                pred = _seg_masks(hd.seg.Segmentation.from_dataset(pred_seg), 1, sops)
                rec["prediction"] = {"mask": save_mask(out, f"pictures/{n:06d}_pred.npz", pred)}
                rec["reference"] = {"mask": save_mask(out, f"pictures/{n:06d}_ref.npz", truth)}
            records.append(rec)
    return records


def _report_pairs(folder: SiteFolder) -> list[tuple[str, str, str]]:
    """(item id, study, reference text) from SR documents and reports.csv."""
    pairs = []
    for path in folder.srs:
        ds = dcmread(path)
        text = sr_text(ds)
        if not text:
            raise DatasetError(f"{path}: an SR report without any TEXT content item (empty reference)")
        pairs.append((f"sr:{ds.SOPInstanceUID}", str(ds.StudyInstanceUID), text))
    csv_path = folder.root / "reports.csv"
    if csv_path.is_file():
        for n, r in enumerate(_rows(csv_path, ("study", "report")), 2):
            pairs.append((f"reports.csv:{n}", r["study"].strip(), r["report"].strip()))
    return pairs


def _report_records(folder: SiteFolder, engine: EvalEngine, s: Settings, clock: Clock) -> list[dict]:
    from inference.pipelines import run_task

    records = []
    for n, (item_id, study, text) in enumerate(_report_pairs(folder)):
        series = folder.first_series(study, item_id)
        datasets = folder.series_datasets(series, folder.root)
        params = {"max_new_tokens": s.max_new_tokens_report}
        rec: dict[str, Any] = {"id": item_id, "task": "report", "prompt": "report", "reference": [text]}
        result, rec["error"] = _attempt(clock, lambda d=datasets, p=params: run_task("report", d, p, engine), n)
        if result is not None:
            r = result.results[0]
            rec["prediction"] = " ".join(x for x in (r.get("findings"), r.get("impression")) if x)
        records.append(rec)
    return records


def _vqa_records(folder: SiteFolder, engine: EvalEngine, s: Settings, clock: Clock) -> list[dict]:
    from inference.pipelines import run_task

    path = folder.root / "vqa.csv"
    if not path.is_file():
        return []
    by_study: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for n, r in enumerate(_rows(path, ("study", "question", "answer")), 2):
        by_study[r["study"].strip()].append((n, r["question"].strip(), r["answer"].strip()))
    records = []
    for study, rows in by_study.items():
        series = folder.first_series(study, f"{path} line {rows[0][0]}")
        datasets = folder.series_datasets(series, path)
        params = {"questions": [q for _, q, _ in rows], "max_new_tokens": s.max_new_tokens_answer}
        result, error = _attempt(clock, lambda d=datasets, p=params: run_task("vqa", d, p, engine), rows[0][0])
        answers = [qa["answer"] for qa in result.results[0]["qa"]] if result is not None else [None] * len(rows)
        for (n, q, a), pred in zip(rows, answers, strict=True):
            rec = {"id": f"vqa.csv:{n}", "task": "vqa", "prompt": q, "reference": a, "error": error,
                   "answer_type": "closed" if is_yes_no(a) else "open"}  # fmt: skip
            if pred is not None:
                rec["prediction"] = pred
            records.append(rec)
    return records


def run_site(
    folder: str | Path,
    out: str | Path,
    engine: EvalEngine,
    *,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Validate ``engine`` on a site folder (see the module docstring); returns the summary, written
    with ``predictions.jsonl`` under ``out``. Raises DatasetError naming the file for bad labels."""
    s = settings or Settings()
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    t0 = time.perf_counter()
    site = SiteFolder(root)
    if not site.segs and not site.srs and not (root / "reports.csv").is_file() and not (root / "vqa.csv").is_file():
        raise DatasetError(f"{root}: no reference SEG, SR report, reports.csv or vqa.csv found")
    _report_pairs(site)  # labels are checked before any model time is spent
    if (root / "vqa.csv").is_file():
        _rows(root / "vqa.csv", ("study", "question", "answer"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [p for p in (root / "reports.csv", root / "vqa.csv") if p.is_file()] + site.segs + site.srs
    meta = {
        "benchmark": "site",
        "task": "site",
        "model": dict(engine.info),
        "engine_settings": asdict(s),
        "dataset": {"path": str(root), "dicom_files": len(site.files),
                    "labels": {str(p.relative_to(root)): sha256_file(p) for p in labels}},
    }  # fmt: skip
    (out / RUN_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    clock = Clock()
    records: list[dict] = []
    for part in (_segment_records, _report_records, _vqa_records):
        recs = part(site, engine, s, clock, out) if part is _segment_records else part(site, engine, s, clock)
        records.extend(recs)
    with open(out / PREDICTIONS, "w", encoding="utf-8") as f:
        for n, rec in enumerate(records):
            if rec.get("error") is None:
                rec["score"] = score_record(rec, out)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if progress is not None:
                progress(n + 1, len(records))
    wall = time.perf_counter() - t0
    timing = {"wall_s": wall, "model_s": clock.compute, "overhead_s": wall - clock.compute}
    summary = build_summary(meta, records, timing)
    write_summary(out, summary)
    log.info("site validation: %d item(s) in %.1f s", len(records), wall)
    return summary
