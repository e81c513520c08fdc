"""Rich tables for the engine benchmark figures."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}{unit}"
        if abs(v) >= 1:
            return f"{v:.2f}{unit}"
        return f"{v:.4f}{unit}" if abs(v) >= 1e-3 else f"{v:.2e}{unit}"
    return f"{v}{unit}"


def print_report(report: dict, console: Console | None = None) -> None:
    con = console or Console(width=max(Console().width, 150))
    env = report["environment"]
    con.print(
        f"[bold]engine benchmark[/bold]  device={env['device']} {env.get('gpu', '')}  torch {env['torch']}  "
        f"onnxruntime {env.get('onnxruntime')}  providers {env.get('ort_providers')}  "
        f"threads {env['cpu_threads']}  load average {env.get('load_average')}"
    )
    for run in report["runs"]:
        title = f"size={run['size']} dtype={run.get('dtype', '-')}"
        llm = run.get("llm")
        if llm:
            t = Table(title=f"LLM / generation — {title}")
            t.add_column("measure")
            t.add_column("value", justify="right")
            t.add_column("detail")
            for row in llm["rows"]:
                t.add_row(row["measure"], _fmt(row["value"], row.get("unit", "")), row.get("detail", ""))
            con.print(t)
        vision = run.get("vision")
        if vision and vision["rows"]:
            labels = sorted({k[:-2] for r in vision["rows"] for k in r if k.endswith("_s") and k != "torch_s"})
            t = Table(title=f"Vision encoders, seconds per call — {title}")
            for col in ["component", "input", "torch s", *[f"{lab} s" for lab in labels]]:
                t.add_column(col, justify="left" if col in ("component", "input") else "right")
            for lab in labels:
                t.add_column(f"torch/{lab}", justify="right")
                t.add_column(f"{lab} rel err", justify="right")
            for r in vision["rows"]:
                cells = [r["component"], r["size"], _fmt(r["torch_s"])]
                cells += [_fmt(r.get(f"{lab}_s")) for lab in labels]
                for lab in labels:
                    sp = r.get(f"{lab}_speedup")
                    cells += [_fmt(sp, "x") if sp is not None else "-", _fmt(r.get(f"{lab}_rel_err"))]
                t.add_row(*cells)
            con.print(t)
        for key in ("build_s", "export_s", "providers", "peak_mem_vqa_only_gb"):
            if key in run:
                con.print(f"  {key}: {run[key]}")
        for s in run.get("skipped", []):
            con.print(f"  [yellow]skipped[/yellow]: {s}")
        for err in run.get("errors", []):
            con.print(f"  [red]error[/red]: {err}")
        for n in run.get("notes", []):
            con.print(f"  note: {n}")
        profiles = {**(run.get("llm") or {}).get("profiles", {}), **run.get("profiles", {})}
        for name, table in profiles.items():
            con.print(f"[bold]profile: {name}[/bold]\n{table}")
