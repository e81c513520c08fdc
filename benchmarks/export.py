"""Export throughput: our outbox exporter (C-STORE SCU and STOW-RS) vs DCMTK storescu, same files, same run.

All senders deliver the same N synthetic CT slices to the same Orthanc (emptied between runs);
each mode is run `repeats` times in alternating order and the best time is kept. Our time is
the exporter's full path: claim rows in the DB, send, record each outcome in the DB.

    python -m benchmarks.export [--n 200] [--size 512] [--repeats 2] [--out figures.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.peers import OrthancServer, storescu_send
from dicom_node.synthetic import make_ct_series

TARGET_RATIO = 0.8


def _exporter_run(
    files: list[Path], workdir: Path, dest: dict[str, Any], *, parallel: int = 4, batch_size: int = 500
) -> tuple[float, float, int]:
    """Queue `files` in a fresh SQLite outbox, then time one exporter round. Returns (enqueue s, send s, sent)."""
    from dicom_node.db import init_db, make_engine
    from dicom_node.export import Exporter, enqueue
    from dicom_node.storage import Storage

    workdir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{workdir / 'index.db'}"
    init_db(url)
    engine = make_engine(url)
    storage = Storage(workdir / "storage", min_free_bytes=0)
    settings = SimpleNamespace(
        node=SimpleNamespace(ae_title="UNIMEDVL"),
        export=SimpleNamespace(max_attempts=3, batch_size=batch_size, parallel=parallel),
        destinations=[SimpleNamespace(**dest)],
    )
    t0 = time.perf_counter()
    for f in files:
        enqueue(engine, storage, f.read_bytes(), [dest["name"]])
    t_enqueue = time.perf_counter() - t0
    exporter = Exporter(settings, engine, storage)
    t0 = time.perf_counter()
    result = exporter.run_once()
    t_send = time.perf_counter() - t0
    engine.dispose()
    return t_enqueue, t_send, result.total_sent


def run(n: int = 200, size: int = 512, repeats: int = 2, workdir: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=workdir) as tmp:
        root = Path(tmp)
        files = make_ct_series(root / "series", n, rows=size, cols=size, seed=3)
        mb = sum(f.stat().st_size for f in files) / 1e6
        best: dict[str, float] = {}
        enqueue_s: list[float] = []
        with OrthancServer(root / "orthanc") as orthanc:
            dimse = {
                "name": "pacs",
                "kind": "dimse",
                "ae_title": orthanc.aet,
                "host": orthanc.host,
                "port": orthanc.dicom_port,
                "timeout_seconds": 60,
            }
            stow = {"name": "web", "kind": "dicomweb", "url": orthanc.dicomweb_url, "timeout_seconds": 120}
            modes = ["storescu", "storescu-x4", "dimse", "dimse-1", "stow"]
            for rep in range(repeats):
                for mode in modes if rep % 2 == 0 else modes[::-1]:
                    orthanc.delete_all()
                    if mode.startswith("storescu"):
                        assocs = 4 if mode.endswith("x4") else 1
                        r = storescu_send(files, orthanc.host, orthanc.dicom_port, orthanc.aet, associations=assocs)
                        if not r.ok:
                            raise RuntimeError(f"storescu failed: {r.output[-2000:]}")
                        seconds, sent = r.seconds, r.n_files
                    else:
                        e, seconds, sent = _exporter_run(
                            files,
                            root / f"{mode}-{rep}",
                            stow if mode == "stow" else dimse,
                            parallel=1 if mode == "dimse-1" else 4,
                        )
                        enqueue_s.append(e)
                    stored = orthanc.count_instances()
                    if sent != n or stored != n:
                        raise RuntimeError(f"{mode}: sent {sent}, Orthanc holds {stored}, expected {n}")
                    best[mode] = min(best.get(mode, float("inf")), seconds)
    rate = {k: n / v for k, v in best.items()}
    return {
        "n": n,
        "size": f"{size}x{size}",
        "mbytes": round(mb, 1),
        "repeats": repeats,
        "storescu_inst_s": round(rate["storescu"], 1),
        "storescu_x4_inst_s": round(rate["storescu-x4"], 1),
        "dimse_inst_s": round(rate["dimse"], 1),
        "dimse_1assoc_inst_s": round(rate["dimse-1"], 1),
        "stow_inst_s": round(rate["stow"], 1),
        "dimse_vs_storescu": round(rate["dimse"] / rate["storescu"], 2),
        "dimse_1assoc_vs_storescu": round(rate["dimse-1"] / rate["storescu"], 2),
        "dimse_vs_storescu_x4": round(rate["dimse"] / rate["storescu-x4"], 2),
        "stow_vs_storescu": round(rate["stow"] / rate["storescu"], 2),
        "enqueue_inst_s": round(n / (sum(enqueue_s) / len(enqueue_s)), 1),
        "target_ratio": TARGET_RATIO,
    }


def main(out: str | None = None, n: int = 200, size: int = 512, repeats: int = 2) -> int:
    """Print the figures (and write them as JSON to `out`); exit 1 if DIMSE export is below 0.8x storescu."""
    logging.basicConfig(level=logging.WARNING)
    fig = run(n=n, size=size, repeats=repeats)
    print(f"export benchmark: {fig['n']} CT slices {fig['size']} ({fig['mbytes']} MB) to Orthanc, best of {repeats}")
    print(f"  DCMTK storescu, 1 association     {fig['storescu_inst_s']:8.1f} inst/s")
    print(f"  DCMTK storescu, 4 associations    {fig['storescu_x4_inst_s']:8.1f} inst/s")
    print(
        f"  unimedvl C-STORE, 4 associations  {fig['dimse_inst_s']:8.1f} inst/s   "
        f"{fig['dimse_vs_storescu']:.2f}x storescu   {fig['dimse_vs_storescu_x4']:.2f}x storescu x4"
    )
    print(
        f"  unimedvl C-STORE, 1 association   {fig['dimse_1assoc_inst_s']:8.1f} inst/s   "
        f"{fig['dimse_1assoc_vs_storescu']:.2f}x storescu"
    )
    print(
        f"  unimedvl STOW-RS, 4 requests      {fig['stow_inst_s']:8.1f} inst/s   "
        f"{fig['stow_vs_storescu']:.2f}x storescu"
    )
    print(f"  enqueue (fsync'd store + DB row)  {fig['enqueue_inst_s']:8.1f} inst/s")
    if out:
        Path(out).write_text(json.dumps(fig, indent=2))
    ok = fig["dimse_vs_storescu"] >= TARGET_RATIO
    print(f"  target >= {TARGET_RATIO}x storescu: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    sys.exit(main(out=a.out, n=a.n, size=a.size, repeats=a.repeats))
