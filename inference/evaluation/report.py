"""The summary of a run: metrics beside the published figure, as JSON, Markdown and a rich table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .registry import BENCHMARKS
from .scoring import summarize_scores

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
TASK_SECTIONS = ("vqa", "mcq", "report", "segment", "synthesis")  # site summaries: one metrics block per task


def build_summary(
    meta: dict[str, Any], records: list[dict[str, Any]], timing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``meta`` (benchmark, task, model, engine settings, dataset hashes) + metrics of ``records`` + the
    headline metric beside the published figure (difference = ours - published)."""
    task = meta.get("task") or (records[0]["task"] if records else "")
    if task == "site":  # several tasks in one run: metrics per task
        tasks = sorted({r["task"] for r in records})
        metrics: dict[str, Any] = {t: summarize_scores(t, [r for r in records if r["task"] == t]) for t in tasks}
    else:
        metrics = summarize_scores(task, records)
    summary: dict[str, Any] = {**meta, "task": task, "metrics": metrics}
    bench = BENCHMARKS.get(str(meta.get("benchmark")))
    if bench is not None:
        ours = metrics.get(bench.headline)
        summary["headline"] = {
            "metric": bench.headline,
            "unit": bench.unit,
            "ours": ours,
            "published": bench.published,
            "difference": None if ours is None or bench.published is None else ours - bench.published,
        }
    summary["failed_items"] = [{"id": r["id"], "error": r["error"]} for r in records if r.get("error")][:20]
    if timing is not None:
        summary["timing"] = timing
    return summary


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without what differs between a run and its re-scoring (timing)."""
    return {k: v for k, v in summary.items() if k != "timing"}


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / SUMMARY_MD).write_text(markdown(summary), encoding="utf-8")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) or "-"
    return str(v)


def rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, ours, published, difference) rows: the headline first, then every other metric."""
    out = []
    head = summary.get("headline")
    if head:
        name = f"{head['metric']} ({head['unit'] or '0-1'})"
        out.append((name, _fmt(head["ours"]), _fmt(head["published"]), _fmt(head["difference"])))
    for k, v in summary.get("metrics", {}).items():
        if isinstance(v, dict) and any(isinstance(x, dict | int | float) for x in v.values()) and k in TASK_SECTIONS:
            out += [(f"{k}: {sub}", _fmt(x), "", "") for sub, x in v.items()]
        elif not head or k != head["metric"]:
            out.append((k, _fmt(v), "", ""))
    return out


def _model_line(summary: dict[str, Any]) -> str:
    m = summary.get("model") or {}
    demo = " (demo weights)" if m.get("is_demo") else ""
    return (
        f"model {m.get('model_name', '?')} {m.get('version', '')}, checkpoint sha256 {m.get('checkpoint_sha256')}{demo}"
    )


def markdown(summary: dict[str, Any]) -> str:
    ds = summary.get("dataset") or {}
    lines = [
        f"# Evaluation: {summary.get('benchmark', '?')}",
        "",
        f"- {_model_line(summary)}",
        f"- engine settings: {json.dumps(summary.get('engine_settings', {}))}",
        f"- dataset: {ds.get('path', '?')}, {ds.get('items', '?')} items, data sha256 {ds.get('data_sha256', '?')}",
    ]
    lines += [f"- note: {n}" for n in ds.get("notes") or []]
    lines += ["", "| metric | ours | published | difference |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(summary)]
    if summary.get("failed_items"):
        lines += ["", "Failed items (not scored):"] + [f"- {f['id']}: {f['error']}" for f in summary["failed_items"]]
    return "\n".join(lines) + "\n"


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """The summary as a rich table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{summary.get('benchmark', '?')}: {_model_line(summary)}")
    for col in ("metric", "ours", "published", "difference"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in rows(summary):
        table.add_row(*r)
    console.print(table)
    for f in summary.get("failed_items") or []:
        console.print(f"failed: {f['id']}: {f['error']}")
