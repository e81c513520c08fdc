"""Research batch benchmark: studies/hour of `unimedvl batch` against Orthanc vs a plain loop.

In one run, on the same synthetic studies (CR and CT, tiny model on CPU by default):

- plain loop (the peer): read each study's files from disk and call the engine directly
  (`inference.pipelines.run_task`, the same report task), nothing fetched or written;
- `unimedvl batch <Orthanc DICOMweb URL> --task report` with 1 and 2 embedded workers:
  WADO-RS fetch into scratch, de-identification, planning, the model, writing the SR under
  DIR, recording results; studies/hour from the first item claimed to the last finished.

Overhead per study = the item's total time (claim to record, from `batch_item.timings`) minus
its model time (medians over the items; the loop's first call is a warm-up, as a warm worker's);
the ratio to the loop's per-study time is the figure the issue bounds (< 20 %
for CT). With 2 CPU workers each gets OMP_NUM_THREADS = cores / 2.

    python -m benchmarks.batch [--cr 20] [--ct 6] [--ct-slices 8] [--workers 1 2] [--out figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.peers import OrthancServer
from dicom_node.synthetic import make_cr, make_ct_series, new_uid

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 8


def make_studies(root: Path, n_cr: int, n_ct: int, ct_slices: int) -> dict[str, list[list[Path]]]:
    out: dict[str, list[list[Path]]] = {"CR": [], "CT": []}
    for i in range(n_cr):
        out["CR"].append([make_cr(root / f"cr{i}", rows=128, cols=128, seed=i, study_uid=new_uid())])
    for i in range(n_ct):
        out["CT"].append(make_ct_series(root / f"ct{i}", ct_slices, rows=64, cols=64, study_uid=new_uid(), seed=i))
    return out


def plain_loop(studies: list[list[Path]]) -> list[float]:
    """Seconds per study: dcmread + run_task(report) with the engine loaded once."""
    from pydicom import dcmread

    from inference.engine.api import load_engine
    from inference.pipelines import run_task

    engine = load_engine("tiny", device="cpu")
    params = {"slices": "middle", "max_new_tokens": MAX_NEW_TOKENS}
    run_task("report", [dcmread(p) for p in studies[0]], params, engine)  # warm-up, as a warm worker
    times = []
    for paths in studies:
        started = time.monotonic()
        run_task("report", [dcmread(p) for p in paths], params, engine)
        times.append(time.monotonic() - started)
    return times


def run_batch(url: str, work: Path, workers: int, tag: str) -> dict[str, Any]:
    cfg = work / f"{tag}.toml"
    cfg.write_text(
        f'[database]\nurl = "sqlite:///{work / tag}.db"\n[broker]\nurl = "sqla+sqlite:///{work / tag}-broker.db"\n'
        f'[storage]\npath = "{work / "storage"}"\nmin_free_bytes = 0\n[model]\npath = "tiny"\ndevice = "cpu"\n'
    )
    cores = os.cpu_count() or 1
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, cores // workers))}
    args = [sys.executable, "-m", "dicom_node.cli", "batch", url, "--out", str(work / f"{tag}-out"), "--task", "report"]
    args += ["--slices", "middle", "--max-new-tokens", str(MAX_NEW_TOKENS), "--workers", str(workers)]
    args += ["--window", str(2 * workers), "--max-fetch", str(2 * workers), "--json-progress", "-c", str(cfg)]
    started = time.monotonic()
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    if r.returncode != 0:
        raise RuntimeError(f"batch failed ({r.returncode}): {r.stderr[-3000:]}")
    from sqlalchemy import create_engine, text

    eng = create_engine(f"sqlite:///{work / tag}.db")
    with eng.connect() as c:
        rows = c.execute(text("SELECT started_at, finished_at, timings, state FROM batch_item")).all()
    eng.dispose()
    from datetime import datetime

    def ts(v: Any) -> datetime:
        return v if isinstance(v, datetime) else datetime.fromisoformat(str(v))

    timings = [json.loads(t) if isinstance(t, str) else t for _, _, t, _ in rows]
    span = (max(ts(f) for _, f, _, _ in rows) - min(ts(s) for s, _, _, _ in rows)).total_seconds()
    return {
        "items": len(rows),
        "done": sum(1 for *_, s in rows if s == "done"),
        "wall_s": round(wall, 2),
        "span_s": round(span, 2),
        "studies_per_hour": round(len(rows) / span * 3600, 1) if span > 0 else None,
        "per_study_total_s": round(statistics.median(t["total_s"] for t in timings), 4),
        "per_study_model_s": round(statistics.median(t["model_s"] for t in timings), 4),
        "per_study_fetch_s": round(statistics.mean(t["fetch_s"] for t in timings), 4),
        "per_study_write_s": round(statistics.mean(t["write_s"] for t in timings), 4),
        "per_study_deid_s": round(statistics.mean(t.get("deid_s", 0.0) for t in timings), 4),
        "per_study_state_s": round(statistics.mean(t.get("state_s", 0.0) for t in timings), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batch")
    ap.add_argument("--cr", type=int, default=20)
    ap.add_argument("--ct", type=int, default=6)
    ap.add_argument("--ct-slices", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    figures: dict[str, Any] = {"cr": a.cr, "ct": a.ct, "ct_slices": a.ct_slices, "max_new_tokens": MAX_NEW_TOKENS}
    with tempfile.TemporaryDirectory(prefix="unimedvl-bench-batch-") as tmp:
        work = Path(tmp)
        studies = make_studies(work / "studies", a.cr, a.ct, a.ct_slices)
        for modality, group in studies.items():
            if not group:
                continue
            loop = plain_loop(group)
            figures[f"{modality}_loop_s_per_study"] = round(statistics.median(loop), 4)
            figures[f"{modality}_loop_studies_per_hour"] = round(3600 / statistics.median(loop), 1)
            with OrthancServer(work / f"orthanc-{modality}", dicomweb=True) as pacs:
                for paths in group:
                    for p in paths:
                        httpx.post(f"{pacs.url}/instances", content=p.read_bytes(), timeout=60).raise_for_status()
                for w in a.workers:
                    res = run_batch(pacs.dicomweb_url, work, w, f"{modality.lower()}-{w}w")
                    overhead = res["per_study_total_s"] - res["per_study_model_s"]
                    res["overhead_s_per_study"] = round(overhead, 4)
                    res["overhead_vs_loop_pct"] = round(100 * overhead / statistics.median(loop), 1)
                    res["rate_vs_loop"] = round(
                        res["studies_per_hour"] / figures[f"{modality}_loop_studies_per_hour"], 2
                    )
                    figures[f"{modality}_batch_{w}w"] = res
    head = ("case", "studies/h", "loop/h", "ratio", "overhead s", "of loop", "fetch s", "deid s", "write s")
    print(f"{head[0]:<14}" + "".join(f"{h:>11}" for h in head[1:]))
    for modality in ("CR", "CT"):
        for w in a.workers:
            r = figures.get(f"{modality}_batch_{w}w")
            if r:
                loop_rate = figures[f"{modality}_loop_studies_per_hour"]
                cells = (r["studies_per_hour"], loop_rate, r["rate_vs_loop"], r["overhead_s_per_study"])
                cells += (f"{r['overhead_vs_loop_pct']}%", r["per_study_fetch_s"], r["per_study_deid_s"])
                cells += (r["per_study_write_s"],)
                print(f"{modality + f' {w}w':<14}" + "".join(f"{c!s:>11}" for c in cells))
    if a.out:
        Path(a.out).write_text(json.dumps(figures, indent=2))
    ct1 = figures.get(f"CT_batch_{a.workers[0]}w")
    return 0 if not ct1 or ct1["overhead_vs_loop_pct"] < 20 else 2


if __name__ == "__main__":
    raise SystemExit(main())
