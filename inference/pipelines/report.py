"""report and vqa: images -> model text -> Enhanced SR (TID 2000 Findings/Impression, Q/A pairs)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset

from inference.preprocess import ModelImage
from sr_writers import Provenance, ReportResult, write_report_sr

from .base import (
    Engine,
    PipelineOutput,
    Progress,
    SeriesInput,
    TaskParams,
    clean_text,
    prepare_images,
    report_progress,
)
from .errors import PipelineError, readable_errors

NO_IMPRESSION = "No separate impression was given by the model; see the findings."
NO_ANSWER = "(the model gave no answer)"
REPORT_SERIES_NUMBER = 9001
VQA_SERIES_NUMBER = 9006
# Images per understanding call: each costs hundreds of vision tokens in the model's context.
MAX_IMAGES = 16

# A section heading: at the start of a line or after a sentence end, optionally in markdown
# emphasis or as a "#" heading, in any case, followed by a colon or by the end of its line.
_HEADING = re.compile(
    r"(?:^|(?<=[.!?])[ \t]+)[ \t]*(?:#+[ \t]*)?[*_]{0,2}[ \t]*"
    r"(?P<name>findings?|impressions?|conclusions?|assessment)"
    r"[ \t]*[*_]{0,2}[ \t]*(?::[ \t]*[*_]{0,2}|[ \t]*$)",
    re.IGNORECASE | re.MULTILINE,
)


def split_report(text: str) -> tuple[str, str]:
    """Model report text -> (findings, impression).

    Headings "Findings"/"Impression" (also Finding, Impressions, Conclusion, Assessment) are
    recognised in any case, with or without markdown; text before the first heading counts as
    findings. Without any heading the whole text is the findings and the impression says so.
    """
    text = clean_text(text)
    matches = list(_HEADING.finditer(text))
    if not matches:
        return text, NO_IMPRESSION if text else ""
    findings: list[str] = []
    impression: list[str] = []
    preamble = text[: matches[0].start()].strip()
    if preamble:
        findings.append(preamble)
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        body = text[m.end() : nxt.start() if nxt else len(text)].strip()
        if not body:
            continue
        (findings if m.group("name").lower().startswith("finding") else impression).append(body)
    f, i = "\n\n".join(findings).strip(), "\n\n".join(impression).strip()
    if f and not i:
        i = NO_IMPRESSION
    return f, i


def _at_most(images: list[ModelImage], out: PipelineOutput) -> list[ModelImage]:
    """Keep an understanding call within MAX_IMAGES: evenly spaced slices of the selection."""
    if len(images) <= MAX_IMAGES:
        return images
    keep = sorted({round(i) for i in np.linspace(0, len(images) - 1, MAX_IMAGES)})
    out.note(f"{len(images)} slices were selected; the model looked at {len(keep)} evenly spaced ones (limit)")
    return [images[i] for i in keep]


def _evidence(series: SeriesInput, images: Sequence[ModelImage]) -> list[Dataset]:
    """The instances the model looked at, in slice order: they are the SR's evidence."""
    used = {img.sop_instance_uid for img in images}
    return [d for d in series.datasets if str(d.SOPInstanceUID) in used]


def run_report(
    series: SeriesInput,
    params: TaskParams,
    engine: Engine,
    provenance: Provenance,
    out: PipelineOutput,
    progress: Progress | None = None,
) -> None:
    images = _at_most(prepare_images(series, params, out), out)
    report_progress(progress, 0, 1)
    with readable_errors("report generation"):
        answer = engine.report(
            [img.pixels for img in images],
            instruction=params.prompt,  # None: the engine's own report instruction
            max_new_tokens=params.max_new_tokens,
            seed=params.seed,
            **params.text_options(),
        )
    findings, impression = split_report(answer.text)
    if not findings and not impression:
        raise PipelineError("the model returned an empty report")
    with readable_errors("writing the report SR"):
        sr = write_report_sr(
            ReportResult(findings=findings, impression=impression, title="AI draft report"),
            _evidence(series, images),
            provenance,
            series_number=REPORT_SERIES_NUMBER,
        )
    out.add(sr, "sr", series.series_instance_uid)
    out.results.append(
        {
            "series_instance_uid": series.series_instance_uid,
            "images": len(images),
            "findings": findings,
            "impression": impression,
        }
    )
    report_progress(progress, 1, 1)


def run_vqa(
    series: SeriesInput,
    params: TaskParams,
    engine: Engine,
    provenance: Provenance,
    out: PipelineOutput,
    progress: Progress | None = None,
) -> None:
    images = _at_most(prepare_images(series, params, out), out)
    pixels = [img.pixels for img in images]
    pairs: list[tuple[str, str]] = []
    for i, question in enumerate(params.questions):
        report_progress(progress, i, len(params.questions))
        with readable_errors(f"answering question {i + 1}"):
            answer = engine.answer(
                pixels, question, max_new_tokens=params.max_new_tokens, seed=params.seed, **params.text_options()
            )
        pairs.append((question, clean_text(answer.text) or NO_ANSWER))
    with readable_errors("writing the question/answer SR"):
        sr = write_report_sr(
            ReportResult(qa=pairs, title="AI question answering"),
            _evidence(series, images),
            provenance,
            series_number=VQA_SERIES_NUMBER,
        )
    out.add(sr, "sr", series.series_instance_uid)
    out.results.append(
        {
            "series_instance_uid": series.series_instance_uid,
            "images": len(images),
            "qa": [{"question": q, "answer": a} for q, a in pairs],
        }
    )
    report_progress(progress, len(params.questions), len(params.questions))
