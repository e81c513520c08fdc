"""The `unimedvl` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="UniMedVL PACS gateway", no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks against peers measured in the same run", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("ingest")
def bench_ingest(
    n: int = typer.Option(200, "--n", help="synthetic CT slices per run"),
    out: str = typer.Option("", "--out", help="also write the figures as JSON here"),
) -> None:
    """C-STORE ingest: our node vs DCMTK storescp vs Orthanc."""
    from benchmarks.ingest import main

    raise typer.Exit(main(n=n, out=out or None))


@bench_app.command("engine")
def bench_engine(
    out: str = typer.Option("", "--out", help="also write the figures as JSON here"),
) -> None:
    """Model engine: prefill/decode tokens/s, denoise steps/s, PyTorch vs onnxruntime encoders."""
    from benchmarks.engine import main

    raise typer.Exit(main(out=out or None))


if __name__ == "__main__":
    app()
