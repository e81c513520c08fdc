"""Evaluation throughput: items/s for VQA and segmentation, and the evaluation's own overhead.

    python -m benchmarks.eval                                  # tiny model, CPU
    python -m benchmarks.eval --device cuda --size full --dtype bf16   # full-size random weights

Runs ``run_benchmark`` on synthetic VQA-RAD and Kvasir-SEG folders (benchmarks/eval_datasets.py) and
reports, from the same run, the model's compute (time inside engine calls) beside the wall time:
overhead = reading and hashing the dataset, loading pictures, scoring (rouge/medpy/skimage), writing
JSONL and pictures. Ratio = wall / compute (1.00 = no overhead).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.eval_datasets import make_dataset
from inference.evaluation import Settings, run_benchmark


def _engine(size: str, device: str, dtype: str) -> Any:
    if size == "tiny":
        from inference.engine import load_engine

        return load_engine("tiny", device=device)
    from benchmarks.gpu_report import build_engine

    return build_engine(size, device, dtype, "all")


def measure(engine: Any, name: str, n: int, size: int, settings: Settings, work: Path) -> dict[str, Any]:
    data = make_dataset(name, work / name, n=n, size=size)
    # warm-up item (first-call costs: library imports, kernel selection) outside the measurement
    run_benchmark(name, data, work / f"warm-{name}", engine, settings=settings, limit=1)
    summary = run_benchmark(name, data, work / f"out-{name}", engine, settings=settings)
    t = summary["timing"]
    return {
        "benchmark": name,
        "items": summary["metrics"]["items"],
        "image_px": size,
        "items_per_s": t["items_per_s"],
        "wall_s": t["wall_s"],
        "model_s": t["model_s"],
        "overhead_s": t["overhead_s"],
        "overhead_share": t["overhead_s"] / t["wall_s"],
        "wall_over_model": t["wall_s"] / t["model_s"] if t["model_s"] else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "full"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--vqa-items", type=int, default=8)
    p.add_argument("--seg-items", type=int, default=4)
    p.add_argument("--image", type=int, default=256, help="synthetic image side in pixels")
    p.add_argument("--steps", type=int, default=10, help="edit-flow steps per mask (the reference uses 50)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default="", help="also write the figures as JSON here")
    a = p.parse_args(argv)
    engine = _engine(a.size, a.device, a.dtype)
    settings = Settings(max_new_tokens_answer=a.max_new_tokens, steps=a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            measure(engine, "vqa-rad", a.vqa_items, a.image, settings, Path(tmp)),
            measure(engine, "kvasir-seg", a.seg_items, a.image, settings, Path(tmp)),
        ]
    print(f"engine: {a.size} on {a.device} ({a.dtype}); {a.steps} steps per mask, {a.max_new_tokens} tokens max")
    head = ("benchmark", "items", "items/s", "wall s", "model s", "overhead s", "wall/model")
    print(f"{head[0]:<12} {head[1]:>5} {head[2]:>8} {head[3]:>8} {head[4]:>8} {head[5]:>10} {head[6]:>10}")
    for r in rows:
        ratio = f"{r['wall_over_model']:.2f}x" if r["wall_over_model"] else "n/a"
        print(f"{r['benchmark']:<12} {r['items']:>5} {r['items_per_s']:>8.2f} {r['wall_s']:>8.2f} {r['model_s']:>8.2f} "
              f"{r['overhead_s']:>10.2f} {ratio:>10}")  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
