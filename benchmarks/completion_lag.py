"""Completion lag: how long after its quiet period a study is completed, and the monitor's idle CPU.

An in-process node (`dicom_node.node.Node`, listener + completion monitor) on a fresh SQLite
index; pynetdicom sends `--studies` small CT studies of `--instances` instances, one after
another, each waited for. Per study: lag = completed_at - last_received_at - quiet period (the
monitor's own delay; the recorded times of the index, no test-side clock). Then the node idles
`--idle` seconds with nothing open and the process CPU time it used is reported (the cost of
the monitor's safety-net rounds). It measures whatever code is on PYTHONPATH, so the same
command compares two checkouts:

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.completion_lag          # this checkout
    PYTHONPATH=/other/checkout .venv/bin/python benchmarks/completion_lag.py  # another one

Prints one line per setting and a JSON object (`--out FILE` to save it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _settings(root: Path, quiet: float, interval: float) -> Any:
    from dicom_node.config import load_config
    from tests.conftest import free_port
    from tests.node.conftest import node_sections, write_config

    sections = node_sections(
        root,
        f"sqlite:///{root / 'index.db'}",
        completion={
            "study_quiet_seconds": quiet,
            "series_quiet_seconds": quiet,
            "force_complete_seconds": 3600,
            "check_interval_seconds": interval,
        },
        http={"bind": f"127.0.0.1:{free_port()}"},
    )
    return load_config(write_config(root / "unimedvl.toml", **sections))


def run(studies: int, instances: int, quiet: float, interval: float, idle: float) -> dict[str, Any]:
    import pydicom

    from dicom_node.node import Node
    from tests.node.conftest import make_ct, store

    with tempfile.TemporaryDirectory() as tmp:
        node = Node(_settings(Path(tmp), quiet, interval))
        node.start()
        done = threading.Event()
        lags: list[float] = []

        def seen(ev: Any) -> None:
            lags.append(ev.latency_seconds - quiet)
            done.set()

        node.monitor.on_study_complete(seen)
        try:
            for _ in range(studies):
                done.clear()
                study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
                sent = [make_ct(study, series, instance_number=i) for i in range(instances)]
                assert [s.Status for s in store(node.port, sent)] == [0] * instances
                if not done.wait(quiet + interval + 30):
                    raise RuntimeError("a study was not completed")
                time.sleep(0.05)  # the next study starts from an idle monitor
            cpu0, wall0 = time.process_time(), time.monotonic()
            time.sleep(idle)
            idle_cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        finally:
            node.stop(grace_seconds=2)
    return {
        "quiet_s": quiet,
        "check_interval_s": interval,
        "studies": studies,
        "lag_median_s": round(statistics.median(lags), 3),
        "lag_max_s": round(max(lags), 3),
        "lags_s": [round(x, 3) for x in lags],
        "idle_cpu_fraction": round(idle_cpu, 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--instances", type=int, default=5)
    ap.add_argument("--quiet", type=float, default=1.0)
    ap.add_argument("--interval", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    results = []
    for interval in args.interval:
        r = run(args.studies, args.instances, args.quiet, interval, args.idle)
        results.append(r)
        print(
            f"quiet {r['quiet_s']} s, check interval {interval} s: lag after the quiet period median "
            f"{r['lag_median_s']} s, max {r['lag_max_s']} s; idle CPU {100 * r['idle_cpu_fraction']:.1f} % of a core"
        )
    out = {"runs": results}
    print(json.dumps(out))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
