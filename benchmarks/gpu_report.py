"""Chest radiograph report on the full-size UniMedVL architecture: seconds against the 60 s clinical bar.

Standalone (no database, broker or network): builds the release architecture (Qwen2.5-7B MoT,
SigLIP-so400m, FLUX VAE) with random weights in bf16 on CUDA, writes a synthetic chest CR and
times the report pipeline end to end, exactly as a worker runs it:
``inference.pipelines.run_task("report", [ds], params, engine)`` = decode + window + resize the
image, ViT + prefill + greedy decoding of up to ``max_new_tokens`` tokens, Enhanced SR writing.
Random weights rarely emit the end token, so every run decodes the full ``max_new_tokens``: a
worst case for the model's own time.

    python -m benchmarks.gpu_report [--size full|small|tiny] [--cr 2048] [--max-new-tokens 512]
                                    [--repeats 3] [--device cuda] [--out gpu_report.json]

Needs, beyond torch/numpy/pillow/safetensors/tokenizers/transformers/rich: pydicom, highdicom
(and highdicom's own pure-Python requirements packaging and typing-extensions). highdicom's
pyjpegls requirement is not imported on this path (`pip install --no-deps highdicom` works).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLINICAL_BAR_S = 60.0  # last image received -> report in the PACS
# The report task's parameters as the routing layer hands them to a worker
# (dicom_node.routing.TaskSpec(kind="report", max_new_tokens=N).parameters(); the smoke test
# checks they agree, so this script needs neither pydantic nor the gateway packages).
REPORT_PARAMS: dict[str, Any] = {
    "kind": "report",
    "prompt": None,
    "questions": [],
    "targets": [],
    "slices": "key:3",
    "window": None,
    "destinations": None,
    "max_new_tokens": 512,
    "steps": 50,
    "seed": 0,
    "size": None,
    "labelmap": False,
}


def report_params(max_new_tokens: int) -> dict[str, Any]:
    return {**REPORT_PARAMS, "max_new_tokens": max_new_tokens}


def build_engine(size: str, device: str, dtype: str, parts: str) -> Any:
    """Random weights of `size` (benchmarks.engine.configs) with the byte-level demo tokenizer."""
    import torch

    from benchmarks.engine.configs import size_configs
    from inference.engine import build_random
    from inference.engine.tokenizer import TextTokenizer

    cfg = size_configs(size)
    # No Qwen2 tokenizer files here: the byte-level tokenizer supplies the special token ids
    # (the config's release ids would disagree with it), the vocabulary size stays the release one.
    cfg["bagel"].pop("new_token_ids", None)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    return build_random(
        cfg, device=device, dtype=torch_dtype, seed=0, parts=parts, tokenizer=TextTokenizer.tiny(), is_demo=True
    )


class _CountingReport:
    """Wraps engine.report to record token counts and the model's own seconds of each call."""

    def __init__(self, engine: Any, device: str) -> None:
        self.engine = engine
        self.device = device
        self.inner = engine.report
        self.calls: list[dict[str, Any]] = []
        engine.report = self

    def __call__(self, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        answer = self.inner(*args, **kw)
        _sync(self.device)
        self.calls.append(
            {
                "model_s": time.perf_counter() - t0,
                "new_tokens": len(getattr(answer, "token_ids", []) or []),
                "prompt_tokens": getattr(answer, "n_prompt_tokens", None),
            }
        )
        return answer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run(
    *,
    size: str = "full",
    cr: int = 2048,
    max_new_tokens: int = 512,
    repeats: int = 3,
    device: str = "cuda",
    dtype: str = "bf16",
    parts: str = "understanding",
) -> dict[str, Any]:
    import pydicom
    import torch

    from dicom_node.synthetic import make_cr
    from inference.pipelines import run_task

    fig: dict[str, Any] = {
        "size": size, "device": device, "dtype": dtype, "parts": parts, "cr": f"{cr}x{cr}",
        "max_new_tokens": max_new_tokens, "clinical_bar_s": CLINICAL_BAR_S, "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None,
        "runs": [],
    }  # fmt: skip
    t0 = time.perf_counter()
    engine = build_engine(size, device, dtype, parts)
    _sync(device)
    fig["build_s"] = round(time.perf_counter() - t0, 2)
    if device.startswith("cuda"):
        fig["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    counter = _CountingReport(engine, device)
    with tempfile.TemporaryDirectory(prefix="gpu-report-") as tmp:
        # Each run reads a fresh dataset from disk, as a worker does (pixels decoded inside the timing).
        for i in range(repeats + 1):  # run 0 is the cold one (CUDA kernels, cuBLAS handles)
            sample = pydicom.dcmread(make_cr(Path(tmp) / f"r{i}", cr, cr, seed=7))
            _sync(device)
            t = time.perf_counter()
            out = run_task("report", [sample], report_params(max_new_tokens), engine)
            _sync(device)
            total = time.perf_counter() - t
            call = counter.calls[-1]
            fig["runs"].append(
                {
                    "cold": i == 0,
                    "total_s": round(total, 3),
                    "model_s": round(call["model_s"], 3),
                    "pre_post_s": round(total - call["model_s"], 3),  # decode/resize + SR writing
                    "new_tokens": call["new_tokens"],
                    "prompt_tokens": call["prompt_tokens"],
                    "tokens_per_s": round(call["new_tokens"] / call["model_s"], 1) if call["model_s"] else None,
                    "objects": [o.kind for o in out.objects],
                    "sr_bytes": len(_encode(out.objects[0].dataset)) if out.objects else 0,
                }
            )
    if device.startswith("cuda"):
        fig["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    warm = [r for r in fig["runs"] if not r["cold"]] or fig["runs"]
    best = min(warm, key=lambda r: r["total_s"])
    fig["best_total_s"] = best["total_s"]
    fig["cold_total_s"] = fig["runs"][0]["total_s"]
    fig["within_bar"] = best["total_s"] < CLINICAL_BAR_S
    # What is left of the 60 s for the quiet period, queueing and delivery once the report is computed.
    fig["budget_left_s"] = round(CLINICAL_BAR_S - best["total_s"], 2)
    return fig


def _encode(ds: Any) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def print_figures(fig: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(
        title=(
            f"Report pipeline, UniMedVL {fig['size']} (random weights, {fig['dtype']}) "
            f"on {fig['gpu'] or fig['device']}: "
            f"chest CR {fig['cr']}, up to {fig['max_new_tokens']} new tokens; clinical bar {fig['clinical_bar_s']:g} s"
        )
    )
    for c in ("run", "total s", "model s", "pre+SR s", "new tokens", "prompt tokens", "tokens/s", "objects"):
        t.add_column(c, justify="right")
    for i, r in enumerate(fig["runs"]):
        t.add_row(
            "cold" if r["cold"] else str(i), f"{r['total_s']:.2f}", f"{r['model_s']:.2f}", f"{r['pre_post_s']:.2f}",
            str(r["new_tokens"]), str(r["prompt_tokens"]), str(r["tokens_per_s"]), ",".join(r["objects"]),
        )  # fmt: skip
    console.print(t)
    mem = f", weights {fig['weights_gib']} GiB, peak {fig['peak_gib']} GiB" if "peak_gib" in fig else ""
    console.print(f"engine built in {fig['build_s']} s{mem}")
    verdict = "[green]within[/]" if fig["within_bar"] else "[red]OVER[/]"
    console.print(
        f"best {fig['best_total_s']:.2f} s (cold {fig['cold_total_s']:.2f} s): {verdict} the "
        f"{fig['clinical_bar_s']:g} s bar, {fig['budget_left_s']:.2f} s left for quiet period, queueing, delivery"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size", default="full", choices=["full", "small", "tiny"])
    p.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="same as --size tiny (CPU check)")
    p.add_argument("--cr", type=int, default=2048, help="CR rows = columns (1024 or 2048)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="warm runs after the cold one")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--parts", default="understanding", choices=["understanding", "all"])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    fig = run(
        size=a.size, cr=a.cr, max_new_tokens=a.max_new_tokens, repeats=a.repeats, device=device, dtype=dtype,
        parts=a.parts,
    )  # fmt: skip
    print_figures(fig)
    if a.out:
        Path(a.out).write_text(json.dumps(fig, indent=2))
    return 0 if fig["within_bar"] else 1


if __name__ == "__main__":
    sys.exit(main())
