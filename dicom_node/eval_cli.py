"""`unimedvl eval`: benchmarks in their released layouts, re-scoring, and site validation.

    unimedvl eval vqa-rad /data/VQA_RAD --out out/vqa-rad     # predictions.jsonl + summary.{json,md}
    unimedvl eval score out/vqa-rad/predictions.jsonl          # the same summary, without the model
    unimedvl eval site /data/site-labels --out out/site        # reference SEGs, reports, VQA CSV (DICOM)

Wired into the main app by ``register(app)``. Exit status: 0 done, 1 some items failed (listed),
2 bad input (the message names the file).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger("dicom_node.eval")


def _engine(config: Path | None, model: str | None, device: str | None, parts: str = "all") -> Any:
    from dicom_node.jobs.cli import _settings  # the config, ./unimedvl.toml by default; exit 2 when bad
    from inference.engine import load_engine

    m = _settings(config).model
    dev = device or m.device
    if dev in ("", "auto"):
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = None if m.dtype in ("", "auto") else m.dtype
    try:
        engine = load_engine(model or m.path, device=dev, dtype=dtype, attention=m.attention, parts=parts)
    except (OSError, ValueError) as exc:  # CheckpointError is a ValueError: names the file and tensor
        typer.echo(f"cannot load the model: {exc}", err=True)
        raise typer.Exit(2) from None
    if m.encoders != "torch":
        from inference.onnx.accelerate import accelerate_engine

        accelerate_engine(engine, m.encoders, m.cache_dir)
    return engine


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        benchmark: str = typer.Argument(
            ...,
            help="vqa-rad, slake, pathvqa, omnimedvqa, mimic-cxr, busi, glas, isic2018, refuge, kvasir-seg, "
            "brats; or 'score' (re-score a predictions.jsonl) or 'site' (a site's labelled DICOM folder)",
        ),  # fmt: skip
        path: Path = typer.Argument(..., help="the dataset folder ('score': the predictions.jsonl)"),
        out: Path | None = typer.Option(None, "--out", "-o", help="output folder (default ./eval-BENCHMARK)"),
        model: str | None = typer.Option(
            None, "--model", help="checkpoint folder or 'tiny' (default: the config's model.path)"
        ),
        device: str | None = typer.Option(
            None, "--device", help="cpu, cuda or cuda:N (default: the config's model.device)"
        ),
        limit: int | None = typer.Option(None, "--limit", min=1, help="only the first N items"),
        steps: int = typer.Option(50, "--steps", min=2, help="denoising steps of the edit flow"),
        max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="answers 128, reports 512"),
        seed: int = typer.Option(0, "--seed"),
        config: Path | None = typer.Option(None, "--config", "-c", help="config file (its model section is used)"),
    ) -> None:
        """Evaluate the model on a benchmark in its released layout, re-score predictions, or validate on a
        site's own labelled DICOM; prints our figures beside the published ones."""
        from rich.console import Console

        from inference.evaluation import DatasetError, RecordError, Settings, print_summary, rescore_file
        from inference.evaluation.report import write_summary

        console = Console()
        try:
            if benchmark == "score":
                summary = rescore_file(path)
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    write_summary(out, summary)
            else:
                tokens = {} if max_new_tokens is None else {"max_new_tokens_answer": max_new_tokens,
                                                            "max_new_tokens_report": max_new_tokens}  # fmt: skip
                settings = Settings(steps=steps, seed=seed, **tokens)
                target = out or Path(f"eval-{benchmark}")
                if benchmark == "site":
                    from inference.evaluation.site import run_site

                    engine = _engine(config, model, device)
                    summary = run_site(path, target, engine, settings=settings)
                else:
                    from inference.evaluation import BENCHMARKS, read_benchmark, run_benchmark

                    read_benchmark(benchmark, path)  # a wrong layout fails before the model is loaded
                    # text-only benchmarks load the understanding weights only (about half the memory)
                    parts = "all" if BENCHMARKS[benchmark].task in ("segment", "synthesis") else "understanding"
                    engine = _engine(config, model, device, parts)
                    summary = run_benchmark(benchmark, path, target, engine, settings=settings, limit=limit)
                console.print(f"predictions: {target / 'predictions.jsonl'}; summary: {target / 'summary.md'}")
        except (DatasetError, RecordError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        print_summary(summary, console)
        if summary.get("failed_items"):
            raise typer.Exit(1)
