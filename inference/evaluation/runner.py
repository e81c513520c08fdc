"""Run a benchmark: read the dataset, call the engine per item, score, write predictions and summary.

    summary = run_benchmark("vqa-rad", "/data/VQA_RAD", "out/", load_engine("/models/UniMedVL"))

Writes ``OUT/predictions.jsonl`` (one record per item, see :mod:`.scoring`), ``OUT/run.json`` (model,
engine settings, dataset hashes), ``OUT/summary.json`` and ``OUT/summary.md``; pictures under
``OUT/pictures/`` named by item number (never by a dataset value).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from inference.preprocess import mask_from_output

from .items import Dataset, Item, Source, load_reference_mask, load_source
from .registry import BENCHMARKS, read_benchmark
from .report import build_summary, write_summary
from .scoring import save_image, save_mask, score_record

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RUN_META = "run.json"


class EvalEngine(Protocol):
    """The part of ``inference.engine.Engine`` evaluation uses."""

    info: dict[str, Any]

    def answer(self, images: list, question: str, **kw: Any) -> Any: ...
    def report(self, images: list, instruction: str | None = None, **kw: Any) -> Any: ...
    def edit_image(self, image: Any, instruction: str, **kw: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class Settings:
    """Engine settings of a run (recorded in the summary). Defaults: the reference's greedy decoding and
    50-step edit flow (``inferencer.py``); ``max_new_tokens`` per task kind."""

    max_new_tokens_answer: int = 128
    max_new_tokens_report: int = 512
    steps: int = 50
    seed: int = 0
    mask_threshold: int = 128


class Clock:
    """Model compute time, so the summary can give evaluation overhead = wall time - compute."""

    def __init__(self) -> None:
        self.compute = 0.0

    def run(self, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.compute += time.perf_counter() - t


def predict(engine: EvalEngine, item: Item, root: Path, out: Path, n: int, s: Settings, clock: Clock) -> dict[str, Any]:
    """Run one item; the record's ``prediction`` / ``reference`` fields (pictures saved under ``out``)."""
    images = [load_source(root, src) for src in item.inputs]
    if item.task in ("vqa", "mcq"):
        ans = clock.run(lambda: engine.answer(images, item.prompt, max_new_tokens=s.max_new_tokens_answer))
        return {"prediction": ans.text, "reference": item.reference}
    if item.task == "report":
        ans = clock.run(lambda: engine.report(images, item.prompt, max_new_tokens=s.max_new_tokens_report))
        return {"prediction": ans.text, "reference": item.reference}
    drawn = clock.run(lambda: engine.edit_image(images[0], item.prompt, steps=s.steps, seed=s.seed))
    if item.task == "segment":
        ref = load_reference_mask(root, item.reference)
        if ref.shape != images[0].shape[:2]:
            raise ValueError(f"reference mask {ref.shape} and image {images[0].shape[:2]} differ in size")
        pred = mask_from_output(np.asarray(drawn), ref.shape[0], ref.shape[1], s.mask_threshold)
        return {
            "prediction": {"mask": save_mask(out, f"pictures/{n:06d}_pred.png", pred)},
            "reference": {"mask": save_mask(out, f"pictures/{n:06d}_ref.png", ref)},
        }
    assert isinstance(item.reference, Source)
    target = load_source(root, item.reference)[:, :, 0]
    gray = np.asarray(drawn, dtype=np.float32).mean(axis=2) if np.asarray(drawn).ndim == 3 else np.asarray(drawn)
    gray8 = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    gray = np.asarray(gray8.resize((target.shape[1], target.shape[0]), Image.Resampling.BILINEAR))
    return {
        "prediction": {"image": save_image(out, f"pictures/{n:06d}_pred.png", gray)},
        "reference": {"image": save_image(out, f"pictures/{n:06d}_ref.png", target)},
    }


def evaluate_items(
    engine: EvalEngine,
    dataset: Dataset,
    out: Path,
    settings: Settings,
    clock: Clock,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Predict and score every item, appending each record to ``out/predictions.jsonl`` as it is done.

    An engine ValueError (input the model refuses) fails its item with that reason; any other exception
    is logged with its traceback and the item retried once, then recorded as failed. Failed items are
    counted in the summary, never scored as zero."""
    records = []
    with open(out / PREDICTIONS, "w", encoding="utf-8") as f:
        for n, item in enumerate(dataset.items):
            if progress is not None:
                progress(n, len(dataset.items))
            rec: dict[str, Any] = {
                "id": item.id,
                "task": item.task,
                "prompt": item.prompt,
                "inputs": [src.to_json() for src in item.inputs],
            }
            for key in ("answer_type", "options", "group", "target"):
                if getattr(item, key) is not None:
                    rec[key] = getattr(item, key)
            error = None
            for attempt in (1, 2):
                try:
                    rec.update(predict(engine, item, dataset.root, out, n, settings, clock))
                    rec["score"] = score_record(rec, out)
                    error = None
                    break
                except ValueError as exc:  # the engine or a metric refusing this item's input
                    error = f"{type(exc).__name__}: {exc}"
                    break
                except Exception as exc:
                    log.exception("evaluation item %d failed (attempt %d)", n, attempt)
                    error = f"{type(exc).__name__}: {exc}"
            rec["error"] = error
            if error:
                log.warning("evaluation item %d failed: %s", n, error)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            records.append(rec)
    if progress is not None:
        progress(len(dataset.items), len(dataset.items))
    return records


def run_benchmark(
    name: str,
    folder: str | Path,
    out: str | Path,
    engine: EvalEngine,
    *,
    settings: Settings | None = None,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``engine`` on benchmark ``name`` read from ``folder``; returns the summary (also written
    under ``out``). Raises DatasetError before any model call when the folder is not in the layout."""
    settings = settings or Settings()
    t0 = time.perf_counter()
    dataset = read_benchmark(name, folder)
    if limit is not None:
        dataset.items = dataset.items[: max(0, int(limit))]
    hashes = dataset.file_hashes()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": name,
        "task": BENCHMARKS[name].task,
        "model": dict(engine.info),
        "engine_settings": asdict(settings),
        "dataset": {"path": str(dataset.root), "items": len(dataset.items), **hashes, "notes": dataset.notes},
    }
    (out / RUN_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    clock = Clock()
    records = evaluate_items(engine, dataset, out, settings, clock, progress)
    wall = time.perf_counter() - t0
    timing = {
        "wall_s": wall,
        "model_s": clock.compute,
        "overhead_s": wall - clock.compute,
        "items_per_s": len(records) / wall if wall > 0 else None,
    }
    summary = build_summary(meta, records, timing)
    write_summary(out, summary)
    return summary
