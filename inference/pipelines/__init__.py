"""Task pipelines: study instances + task parameters -> model calls -> DICOM objects to store and send.

    out = run_task("report", datasets, spec.parameters(), engine)
    for obj in out.objects:          # obj.dataset (pydicom), obj.kind: sr | seg | tid1500 | sc | derived
        store(to_bytes(obj.dataset))

| kind          | engine call per series                   | objects                                 |
|---------------|------------------------------------------|-----------------------------------------|
| report        | report(selected slices, prompt)          | sr (Enhanced SR, Findings/Impression)   |
| vqa           | answer(selected slices, q) per question  | sr (Enhanced SR, Q/A TEXT items)        |
| segment       | edit_image(slice, instruction) per slice | seg (BINARY/LABELMAP) + tid1500         |
|               | and target                               |                                         |
| translate     | edit_image(slice, prompt) per slice      | derived (source SOP class and geometry) |
| super_resolve | edit_image(slice, prompt) per slice      | derived (same grid as the source)       |
| synthesize    | generate_image(prompt) once per task     | sc (Secondary Capture, SYN)             |

Input errors (undecodable pixels, bad parameters, sources a writer cannot carry, an engine
refusal) raise ``PipelineError`` (``errors.py``) with a readable ``reason`` naming the series and,
for pixel errors, the instance; any other exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydicom import Dataset

from sr_writers import Provenance

from .base import (
    OBJECT_KINDS,
    TASK_KINDS,
    Engine,
    OutputObject,
    PipelineError,
    PipelineOutput,
    Progress,
    TaskParams,
    group_series,
    parse_params,
    provenance_from_engine,
    series_label,
)
from .image_to_image import run_image_to_image
from .report import run_report, run_vqa, split_report
from .segment import run_segment
from .synthesize import run_synthesize

log = logging.getLogger(__name__)

_PER_SERIES = {
    "report": run_report,
    "vqa": run_vqa,
    "segment": run_segment,
    "translate": run_image_to_image,
    "super_resolve": run_image_to_image,
}
_WHAT = {"sr": "SR", "seg": "SEG", "tid1500": "measurement SR", "sc": "secondary capture", "derived": "derived image"}


def run_task(
    kind: str,
    datasets: Sequence[Dataset],
    params: Mapping[str, Any],
    engine: Engine,
    provenance: Provenance | None = None,
    *,
    progress: Progress | None = None,
) -> PipelineOutput:
    """Run one task on the instances of the matched series (one study; pixel data loaded).

    ``params`` is the rule's task parameters (``TaskSpec.parameters()``); ``provenance`` defaults
    to one built from ``engine.info``. ``progress(done, total)`` is called between model calls.
    Raises PipelineError for input errors (its ``reason`` is the job's failure reason, naming
    the series by number and description); every other exception is a bug and propagates.
    """
    task = parse_params(kind, params)
    if provenance is None:
        provenance = provenance_from_engine(getattr(engine, "info", None) or {})
    out = PipelineOutput(task=kind, model=dict(getattr(engine, "info", None) or {}))
    series = group_series(datasets, out)
    started = time.monotonic()
    if kind == "synthesize":
        run_synthesize(series, task, engine, provenance, out, progress)
    else:
        for s in series:
            try:
                _PER_SERIES[kind](s, task, engine, provenance, out, progress)
            except PipelineError as exc:
                # Name the series so the operator can find it without a UID (no PHI in reasons).
                raise PipelineError(f"{series_label(s)}: {exc.reason}") from exc
    out.summary = _summary(kind, out, len(series))
    # No identifiers here: counts and timing only (logs must not carry PHI).
    log.info(
        "task %s: %d series -> %d object(s) in %.2f s", kind, len(series), len(out.objects), time.monotonic() - started
    )
    return out


def _summary(kind: str, out: PipelineOutput, n_series: int) -> str:
    counts: dict[str, int] = {}
    for o in out.objects:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    parts = [f"{n} {_WHAT[k]}{'s' if n > 1 else ''}" for k, n in counts.items()]
    where = "the study" if kind == "synthesize" else f"{n_series} series"
    text = f"{kind} on {where}: {', '.join(parts) or 'no objects'}"
    if kind == "segment":
        found = [f"{s['label']} on {s['slices_with_finding']} slice(s)" for r in out.results for s in r["segments"]]
        text += f"; found {', '.join(found)}"
    if out.model.get("is_demo"):
        text += " (demo weights)"
    return text


__all__ = [
    "OBJECT_KINDS",
    "TASK_KINDS",
    "Engine",
    "OutputObject",
    "PipelineError",
    "PipelineOutput",
    "TaskParams",
    "parse_params",
    "provenance_from_engine",
    "run_task",
    "split_report",
]
