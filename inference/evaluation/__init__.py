"""Model evaluation: published benchmarks in their released layouts, and a site's own labelled DICOM.

    from inference.evaluation import run_benchmark, rescore_file
    summary = run_benchmark("slake", "/data/Slake1.0", "out/slake", engine)   # predictions.jsonl + summary
    again = rescore_file("out/slake/predictions.jsonl")                      # no model: same summary

| module | what |
|---|---|
| registry | benchmark names, readers, headline metric, published UniMedVL figure |
| datasets_text / datasets_imaging | readers per released layout (DatasetError names the file) |
| answers | prompts, answer normalisation, closed/open split, multiple-choice matching |
| metrics | ROUGE-L, BLEU, Dice, HD95, SSIM, PSNR from rouge-score / nltk / medpy / scikit-image |
| scoring | per-item scores and aggregates from prediction records only |
| runner | engine calls per item, predictions JSONL, timing |
| report | summary JSON / Markdown / rich table beside the published figures |
| site | a site's reference SEGs, reports (SR or text) and VQA CSV against the gateway's pipelines |

Nothing here imports ``dicom_node``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .items import DatasetError
from .registry import BENCHMARKS, read_benchmark
from .report import build_summary, comparable, print_summary
from .runner import RUN_META, Settings, run_benchmark
from .scoring import RecordError, rescore


def rescore_file(predictions: str | Path) -> dict[str, Any]:
    """The summary of a predictions file recomputed without the model (``run.json`` beside it supplies
    the model, settings and dataset hashes). Raises RecordError naming the file and line."""
    path = Path(predictions)
    meta_path = path.parent / RUN_META
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    records = rescore(path)
    if not meta:  # no run.json: one task, or a site run's several
        tasks = {r["task"] for r in records}
        meta = {"task": tasks.pop() if len(tasks) == 1 else "site"}
    return build_summary(meta, records)


__all__ = [
    "BENCHMARKS",
    "DatasetError",
    "RecordError",
    "Settings",
    "build_summary",
    "comparable",
    "print_summary",
    "read_benchmark",
    "rescore_file",
    "run_benchmark",
]
