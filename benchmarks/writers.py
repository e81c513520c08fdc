"""Throughput of the DICOM result writers (sr_writers).

Writing has no natural peer product, so each figure is set against a reference measured in the
same run on the same machine: pydicom's plain ``dcmwrite`` of the source slices the object is
built from (100 CT slices of 256x256, or one slice for the Secondary Capture). The ratio says how
many plain source writes one result object costs.

    python -m benchmarks.writers [--out figures.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from rich.console import Console
from rich.table import Table

from dicom_node.synthetic import ct_series
from sr_writers import (
    DerivedImages,
    Provenance,
    ReportResult,
    Segment,
    SegmentationResult,
    SynthesizedImage,
    to_bytes,
    write_derived_series,
    write_measurements_sr,
    write_report_sr,
    write_secondary_capture,
    write_seg,
)

N_SLICES, SIZE = 100, 256
MIN_SECONDS, MIN_RUNS = 1.5, 3


def _timed(fn: Callable[[], object]) -> tuple[float, int]:
    """Median seconds per call over at least MIN_RUNS calls and MIN_SECONDS."""
    fn()  # warm caches and imports
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < MIN_SECONDS:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def _sources() -> list[pydicom.Dataset]:
    series = ct_series(N_SLICES, SIZE, SIZE, order="random", seed=11)
    return [pydicom.dcmread(io.BytesIO(to_bytes(ds))) for ds in series]


def _masks(sources: list[pydicom.Dataset]) -> SegmentationResult:
    """A sphere of radius 40 px through the middle 60 slices."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    ordered = sorted(sources, key=lambda s: float(s.SliceLocation))
    masks = {}
    for k, s in enumerate(ordered):
        dz = (k - N_SLICES / 2) * 1.5
        r2 = 40**2 - dz**2
        if r2 > 0:
            masks[str(s.SOPInstanceUID)] = (yy - 128) ** 2 + (xx - 120) ** 2 < r2
    return SegmentationResult([Segment("Tumour")], masks)


def _plain_write(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        pydicom.dcmwrite(io.BytesIO(), ds, enforce_file_format=True)


def run() -> list[dict]:
    prov = Provenance(model_version="bench", checkpoint_hash="0" * 64)
    sources = _sources()
    result = _masks(sources)
    seg = write_seg(result, sources, prov)
    report = ReportResult(
        findings="Rundherd im rechten Oberlappen. " * 20, impression="Kontrolle.", qa=[("Nodule?", "Yes")] * 5
    )
    rgb = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    derived = DerivedImages(
        {str(s.SOPInstanceUID): s.pixel_array.astype(np.float64) - 1024 for s in sources}, "super-resolution"
    )

    ref_series, _ = _timed(lambda: _plain_write(sources))
    ref_slice, _ = _timed(lambda: _plain_write(sources[:1]))
    cases = [
        (
            "Enhanced SR report (evidence: 100 slices)",
            lambda: to_bytes(write_report_sr(report, sources, prov)),
            ref_series,
            1,
        ),
        ("SEG BINARY, 100x256x256, 1 segment", lambda: to_bytes(write_seg(result, sources, prov)), ref_series, 1),
        (
            "SEG LABELMAP, 100x256x256, 1 segment",
            lambda: to_bytes(write_seg(result, sources, prov, segmentation_type="LABELMAP")),
            ref_series,
            1,
        ),
        (
            "TID 1500 SR (areas per slice + volume)",
            lambda: to_bytes(write_measurements_sr(result, seg, sources, prov)),
            ref_series,
            1,
        ),
        (
            "TID 1500 SR (volume only, per_slice_areas=False)",
            lambda: to_bytes(write_measurements_sr(result, seg, sources, prov, per_slice_areas=False)),
            ref_series,
            1,
        ),
        (
            "Secondary Capture 512x512 RGB",
            lambda: to_bytes(write_secondary_capture(SynthesizedImage(rgb), sources[:1], prov)),
            ref_slice,
            1,
        ),
        (
            "Derived series, 100 slices",
            lambda: [to_bytes(d) for d in write_derived_series(derived, sources, prov)],
            ref_series,
            N_SLICES,
        ),
    ]
    rows = []
    for name, fn, ref, instances in cases:
        seconds, runs = _timed(fn)
        rows.append(
            {
                "object": name,
                "ms_per_object": seconds * 1000,
                "objects_per_s": 1 / seconds,
                "instances_per_s": instances / seconds,
                "runs": runs,
                "reference": "dcmwrite of its 100 source slices" if ref is ref_series else "dcmwrite of 1 source slice",
                "reference_ms": ref * 1000,
                "ratio_vs_reference": seconds / ref,
            }
        )
    return rows


def main(out: str | Path | None = None) -> int:
    console = Console()
    rows = run()
    table = Table(title=f"sr_writers throughput ({platform.python_version()}, in-memory Part 10 bytes)")
    for col in ("object", "ms/object", "objects/s", "instances/s", "reference (same run)", "ref ms", "x ref"):
        table.add_column(col, justify="left" if col.startswith(("object", "reference")) else "right")
    for r in rows:
        table.add_row(
            r["object"],
            f"{r['ms_per_object']:.1f}",
            f"{r['objects_per_s']:.1f}",
            f"{r['instances_per_s']:.1f}",
            r["reference"],
            f"{r['reference_ms']:.1f}",
            f"{r['ratio_vs_reference']:.2f}",
        )
    console.print(table)
    if out:
        Path(out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the figures as JSON to this file")
    sys.exit(main(parser.parse_args().out))
