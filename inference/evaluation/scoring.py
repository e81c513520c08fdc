"""Per-item scores and the summary, computed only from prediction records (JSONL lines), so that
``unimedvl eval score PREDICTIONS.jsonl`` reproduces a run's summary without the model.

A record: ``id``, ``task``, ``prompt``, ``prediction``, ``reference``, ``answer_type`` / ``options`` /
``group`` / ``spacing_mm`` where they apply, ``score`` and ``error``. Pictures (masks, synthesized
images) are files beside the JSONL, named in the record relative to its folder.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import metrics
from .answers import closed_correct, mcq_choice, open_recall


class RecordError(ValueError):
    """A predictions file line that cannot be scored; the message names the file and line."""


def load_picture(base: Path, rel: str) -> np.ndarray:
    """A stored mask (PNG: non-zero is in the mask; NPZ: array ``mask``) or image (PNG, gray or RGB)."""
    path = base / rel
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z["mask"]
    with Image.open(path) as im:
        return np.asarray(im)


def save_mask(base: Path, rel: str, mask: np.ndarray) -> str:
    path = base / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask.ndim == 2 and path.suffix == ".png":
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    else:
        np.savez_compressed(path, mask=mask.astype(bool))
    return rel


def save_image(base: Path, rel: str, image: np.ndarray) -> str:
    path = base / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
    return rel


def score_record(rec: dict[str, Any], base: Path) -> dict[str, Any]:
    """The per-item score of one record (see the module docstring). Raises ValueError on bad content."""
    task, pred, ref = rec["task"], rec.get("prediction"), rec.get("reference")
    if task == "vqa":
        if rec.get("answer_type") == "closed":
            return {"correct": int(closed_correct(str(pred), str(ref)))}
        return {"recall": open_recall(str(pred), str(ref))}
    if task == "mcq":
        choice = mcq_choice(str(pred), dict(rec.get("options") or {}))
        return {"choice": choice, "correct": int(choice == ref)}
    if task == "report":
        return {"rougeL": metrics.rouge_l(str(pred), list(ref) if isinstance(ref, list) else [str(ref)])}
    if task == "segment":
        p = load_picture(base, pred["mask"]).astype(bool)
        r = load_picture(base, ref["mask"]).astype(bool)
        return {"dice": metrics.dice(p, r), "hd95": metrics.hd95(p, r, rec.get("spacing_mm"))}
    if task == "synthesis":
        p, r = load_picture(base, pred["image"]), load_picture(base, ref["image"])
        return {"ssim": metrics.ssim(p, r), "psnr": metrics.psnr(p, r)}
    raise ValueError(f"unknown task {task!r}")


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: cannot be read ({exc})") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{n}: not JSON ({exc})") from exc
        if not isinstance(rec, dict) or not {"id", "task"} <= set(rec):
            raise RecordError(f"{path}:{n}: a record needs 'id' and 'task'")
        records.append(rec)
    if not records:
        raise RecordError(f"{path}: no record")
    return records


def rescore(path: Path) -> list[dict[str, Any]]:
    """Every record of a predictions file with its score recomputed from its prediction and reference."""
    out = []
    for n, rec in enumerate(read_records(path), 1):
        rec = dict(rec)
        if rec.get("error") is None:
            try:
                rec["score"] = score_record(rec, path.parent)
            except (ValueError, OSError, KeyError, TypeError) as exc:
                raise RecordError(f"{path}:{n} (item {rec['id']!r}): cannot be scored ({exc})") from exc
        out.append(rec)
    return out


def _pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


def _by_group(records: list[dict[str, Any]], key: str, scale: float = 100.0) -> dict[str, float | None]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get("group"):
            groups[r["group"]].append(r["score"][key])
    return {g: (scale * sum(v) / len(v)) for g, v in sorted(groups.items())}


def summarize_scores(task: str, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate metrics of scored records (failed items are counted, not scored)."""
    recs = list(records)
    ok = [r for r in recs if r.get("error") is None]
    m: dict[str, Any] = {"items": len(recs), "failed": len(recs) - len(ok)}
    if task == "vqa":
        closed = [r["score"]["correct"] for r in ok if r.get("answer_type") == "closed"]
        opened = [r["score"]["recall"] for r in ok if r.get("answer_type") != "closed"]
        m.update(closed_items=len(closed), open_items=len(opened))
        m["closed_accuracy"] = _pct(metrics.mean(closed))
        m["open_recall"] = _pct(metrics.mean(opened))
        m["overall"] = _pct(metrics.mean([*closed, *opened]))
    elif task == "mcq":
        m["accuracy"] = _pct(metrics.mean([r["score"]["correct"] for r in ok]))
        m["no_option_inferred"] = sum(1 for r in ok if r["score"]["choice"] is None)
        m["accuracy_by_group"] = _by_group(ok, "correct")
    elif task == "report":
        m["rougeL"] = metrics.mean([r["score"]["rougeL"] for r in ok])
        if ok:
            refs = [r["reference"] if isinstance(r["reference"], list) else [r["reference"]] for r in ok]
            m.update(metrics.corpus_bleu_n([str(r["prediction"]) for r in ok], refs))
    elif task == "segment":
        m["dice_by_group"] = _by_group(ok, "dice")
        per_target: dict[str, list[float]] = defaultdict(list)
        for r in ok:
            per_target[r.get("target") or ""].append(r["score"]["dice"])
        m["dice_by_target"] = {t: 100.0 * sum(v) / len(v) for t, v in sorted(per_target.items())}
        # mDice: per-image mean Dice, averaged over the targets (REFUGE: optic disc and optic cup)
        m["mdice"] = metrics.mean(list(m["dice_by_target"].values()))
        hd = [r["score"]["hd95"] for r in ok]
        m["hd95"] = metrics.mean(hd)
        m["hd95_unit"] = "mm" if any(r.get("spacing_mm") for r in ok) else "px"
        m["hd95_undefined"] = sum(1 for v in hd if v is None)
    elif task == "synthesis":
        m["ssim"] = _pct(metrics.mean([r["score"]["ssim"] for r in ok]))
        m["psnr"] = metrics.mean([r["score"]["psnr"] for r in ok])
        m["ssim_by_group"] = _by_group(ok, "ssim")
    return m
