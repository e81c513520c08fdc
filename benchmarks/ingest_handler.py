"""In-process microbenchmark of the C-STORE handler's own work: `Ingest.receive_file`.

    python -m benchmarks.ingest_handler --n 200 --repeats 2 --out handler.json
    PYTHONPATH=/work/main .venv/bin/python benchmarks/ingest_handler.py   # another checkout's code

No network and no pynetdicom: N synthetic 512x512 CT slices are copied into the storage's
`tmp/` (where pynetdicom's chunked receive leaves them) and handed to `receive_file` one by one
(1 thread) and from 8 threads at once (8 associations), on a fresh storage and SQLite index
per run. Prints ms per instance for each step the handler reports (write = read back + hash +
checks, fsync = rest of the file's fdatasync + rename, index = group commit wait) and the
wall-clock rate. It imports only `dicom_node`, so the same file measures whichever checkout
is first on PYTHONPATH (before/after in the same session). `--profile cprofile` writes a
pstats file per thread count; run it under `py-spy record -f raw` for native frames.
The machine is shared: compare figures from the same run only, and report the load.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from dicom_node.db import init_db, make_engine
from dicom_node.ingest import Ingest, Peer
from dicom_node.storage import Storage
from dicom_node.synthetic import make_ct_series

CT_EXPLICIT_LE = "1.2.840.10008.1.2.1"
PEER = Peer("BENCH", "UNIMEDVL", "127.0.0.1")


def _run(sources: list[Path], threads: int, work: Path, profile: Path | None) -> dict[str, Any]:
    """One run: fresh storage + index, every file through `receive_file` from `threads` threads."""
    root = work / f"run-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{root / 'index.db'}"
    init_db(url)
    engine = make_engine(url, pool_size=5, max_overflow=threads + 5)
    ingest = Ingest(engine, Storage(root / "storage"), max_instance_bytes=1 << 31)
    # Where pynetdicom would have left them: the storage's tmp/ (same filesystem: rename, no copy).
    staged = []
    for p in sources:
        dst = ingest.storage.tmp_dir / f"{uuid.uuid4().hex}.rcv"
        shutil.copyfile(p, dst)
        staged.append(dst)
    os.sync()  # the copies' writeback must not land inside the timed loop
    # Warm-up: first connection, statement compilation, shard directory.
    warm = make_ct_series(root / "warm", 1, seed=99, patient_id="WARM")[0]
    w = ingest.storage.tmp_dir / "warm.rcv"
    shutil.copyfile(warm, w)
    ingest.receive_file(w, PEER, transfer_syntax_uid=CT_EXPLICIT_LE)

    outcomes: list[Any] = []
    lock = threading.Lock()
    prof = cProfile.Profile() if profile else None

    def worker(paths: list[Path]) -> None:
        mine = [ingest.receive_file(p, PEER, transfer_syntax_uid=CT_EXPLICIT_LE) for p in paths]
        with lock:
            outcomes.extend(mine)

    shares = [staged[i::threads] for i in range(threads)]
    t0, c0 = time.perf_counter(), os.times()
    if prof is not None and threads == 1:
        prof.enable()
    if threads == 1:
        worker(staged)
    else:
        pool = [threading.Thread(target=worker, args=(s,)) for s in shares]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    seconds = time.perf_counter() - t0
    c1 = os.times()
    if prof is not None and threads == 1:
        prof.disable()
        prof.dump_stats(str(profile))
    stats = ingest.committer.stats
    ingest.close()
    engine.dispose()
    shutil.rmtree(root, ignore_errors=True)
    n = len(outcomes)
    assert n == len(sources) and all(o.action == "stored" for o in outcomes), "an instance was not stored"

    def ms(attr: str) -> float:
        return round(1000 * statistics.fmean(getattr(o, attr) for o in outcomes), 3)

    return {
        "threads": threads,
        "n": n,
        "seconds": round(seconds, 3),
        "inst_per_s": round(n / seconds, 1),
        "write_ms": ms("write_s"),
        "fsync_ms": ms("fsync_s"),
        "index_ms": ms("index_s"),
        "handler_ms": round(ms("write_s") + ms("fsync_s") + ms("index_s"), 3),
        # CPU of the whole process (every thread: handlers, committer, sync pool) per instance.
        "cpu_user_ms": round(1000 * (c1.user - c0.user) / n, 3),
        "cpu_sys_ms": round(1000 * (c1.system - c0.system) / n, 3),
        "rows_per_batch": round(stats.rows_per_batch, 2),
        "load": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile output prefix (1 thread only)")
    ap.add_argument("--out", type=Path, default=None, help="write the runs as JSON here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ingest-handler-", dir=args.work))
    try:
        sources = make_ct_series(work / "src", args.n, seed=0)
        runs = []
        for rep in range(args.repeats):
            for threads in args.threads:
                prof = args.profile.with_suffix(f".t{threads}.r{rep}.pstats") if args.profile else None
                r = _run(sources, threads, work, prof)
                r["repeat"] = rep
                runs.append(r)
                print(
                    f"threads={threads} rep={rep}: {r['inst_per_s']:6.1f} inst/s  handler {r['handler_ms']:6.2f} ms"
                    f" = write {r['write_ms']:5.2f} + fsync {r['fsync_ms']:5.2f} + index {r['index_ms']:6.2f}"
                    f"  cpu {r['cpu_user_ms']:5.2f} user + {r['cpu_sys_ms']:5.2f} sys"
                    f"  rows/batch {r['rows_per_batch']:4.1f}  load {r['load']}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        import dicom_node

        args.out.write_text(
            json.dumps({"code": str(Path(dicom_node.__file__).parent.parent), "runs": runs}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
