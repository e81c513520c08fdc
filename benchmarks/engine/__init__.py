"""Engine benchmark: prefill/decode tokens/s, denoising steps/s, ViT and VAE under PyTorch vs onnxruntime.

``unimedvl bench engine`` calls ``main(out=...)``; ``python -m benchmarks.engine --device cuda --size full
--dtype bf16`` runs the release architecture with random weights on a GPU. See ``main`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.engine.configs import SIZES, size_configs
from benchmarks.engine.report import print_report
from benchmarks.engine.vision import VisionWorkload, bench_vision

log = logging.getLogger("benchmarks.engine")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# what each size measures; "full" follows the GPU targets
WORKLOADS: dict[str, dict] = {
    "tiny": {
        "vision": VisionWorkload(vit_sizes=[(28, 42), (56, 84)], vae_sizes=[(64, 64), (96, 128)], repeats=5),
        "prefill_tokens": 64,
        "decode_tokens": 24,
        "image_hw": (64, 64),
        "denoise_steps": 4,
    },
    "small": {
        "vision": VisionWorkload(vit_sizes=[(112, 112), (224, 224)], vae_sizes=[(128, 128), (256, 256)], repeats=3),
        "prefill_tokens": 128,
        "decode_tokens": 24,
        "image_hw": (128, 128),
        "denoise_steps": 4,
    },
    "full": {
        "vision": VisionWorkload(vit_sizes=[(518, 518), (980, 980)], vae_sizes=[(512, 512), (1024, 1024)], repeats=5),
        "prefill_tokens": 1024,
        "decode_tokens": 512,  # a report-length answer
        "image_hw": (1024, 1024),
        "denoise_steps": 4,
        "full_image_steps": 50,
    },
}


def _environment(device: str) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
        "load_average": os.getloadavg(),  # CPU figures are only comparable on an otherwise idle machine
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for mod in ("onnxruntime", "flash_attn", "tensorrt"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # optional accelerators: record why they are absent
            env[mod] = f"unavailable ({type(e).__name__})"
    try:
        import onnxruntime

        env["ort_providers"] = onnxruntime.get_available_providers()
    except Exception:
        env["ort_providers"] = []
    return env


def run_size(
    size: str,
    *,
    device: str,
    dtype: torch.dtype,
    cache_dir: Path,
    parts: set[str],
    profile: bool,
    repeats: int | None = None,
    quick: bool = False,
) -> dict:
    """Every measurement for one model size; returns the figures as a JSON-ready dict."""
    from benchmarks.engine.build import build_vision_modules
    from benchmarks.engine.llm import bench_llm, build_engine, peak_memory_vqa_only

    cfg = size_configs(size)
    work = copy.deepcopy(WORKLOADS[size])
    if repeats is not None:
        work["vision"].repeats = repeats
    if quick:  # smoke runs: the smallest input of each kind, few tokens and steps
        work["vision"].vit_sizes = work["vision"].vit_sizes[:1]
        work["vision"].vae_sizes = work["vision"].vae_sizes[:1]
        work |= {"prefill_tokens": 16, "decode_tokens": 4, "denoise_steps": 3}
        work.pop("full_image_steps", None)
    res: dict = {"size": size, "dtype": str(dtype).removeprefix("torch."), "skipped": [], "notes": [], "errors": []}
    engine = None
    if "llm" in parts:
        with _section(res, "llm"):
            t0 = time.perf_counter()
            engine, why = build_engine(cfg, device=device, dtype=dtype, seed=0, parts="all")
            if engine is None:
                res["skipped"].append(f"llm: {why}")
            else:
                res["build_s"] = time.perf_counter() - t0
                res["llm"] = bench_llm(engine, cfg, work, device=device, profile=profile, notes=res["notes"])

    if "vision" in parts:
        with _section(res, "vision"):
            # the engine's own modules when it was built, else the same shapes built here
            src = engine if engine is not None and getattr(engine, "vae", None) is not None else None
            if src is None:
                src = build_vision_modules(cfg, device=device, dtype=dtype, seed=0)
            res["vision"] = _vision_section(src, work, device, dtype, cache_dir, profile, res)
            del src

    del engine
    if device.startswith("cuda") and "llm" in res and work.get("full_image_steps"):
        with _section(res, "peak memory, understanding-only"):
            res["peak_mem_vqa_only_gb"] = peak_memory_vqa_only(cfg, device=device, dtype=dtype, work=work)
    return res


@contextlib.contextmanager
def _section(res: dict, name: str):
    """Record a failing part (e.g. out of GPU memory) and go on: one failure must not lose the other figures."""
    try:
        yield
    except Exception as e:
        log.error("engine benchmark: %s failed", name, exc_info=True)
        res["errors"].append(f"{name}: {type(e).__name__}: {e}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _vision_section(engine, work, device, dtype, cache_dir: Path, profile: bool, res: dict) -> dict:
    from inference.onnx import build_encoders

    accelerated: dict[str, object] = {}
    backends = ["onnx"]
    if device.startswith("cuda"):
        backends.append("tensorrt")
    for backend in backends:
        if backend == "tensorrt":
            import onnxruntime

            if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
                res["skipped"].append(
                    "tensorrt: onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu + TensorRT)"
                )
                continue
        try:
            t0 = time.perf_counter()
            built = build_encoders(
                backend=backend,
                cache_dir=cache_dir,
                vit=engine.vit_model,
                connector=engine.connector,
                vit_pos_table=_pos_table(engine),
                # TensorRT for the ViT only: building VAE engines for every profile takes minutes
                ae=engine.vae if backend == "onnx" else None,
                threads=torch.get_num_threads(),  # same CPU budget as PyTorch
            )
            res.setdefault("export_s", {})[backend] = time.perf_counter() - t0
            res.setdefault("providers", {})[backend] = built.providers
            accelerated[backend] = built
        except Exception as e:
            res["skipped"].append(f"{backend}: export/session failed ({type(e).__name__}: {e})")
    figs = bench_vision(
        vit=engine.vit_model,
        connector=engine.connector,
        vit_pos_table=_pos_table(engine),
        ae=engine.vae,
        accelerated=accelerated,
        workload=work["vision"],
        device=device,
        dtype=dtype,
        profile=profile,
    )
    res["notes"] += figs.notes
    if figs.profiles:
        res.setdefault("profiles", {}).update(figs.profiles)
    return {"rows": figs.rows}


def _pos_table(engine) -> torch.Tensor:
    pos = engine.vit_pos_embed
    return pos if isinstance(pos, torch.Tensor) else pos.pos_embed


def main(
    out: str | None = None,
    *,
    device: str | None = None,
    sizes: list[str] | None = None,
    dtype: str | None = None,
    parts: list[str] | None = None,
    cache_dir: str | None = None,
    profile: bool = False,
    repeats: int | None = None,
    quick: bool = False,
    threads: int | None = None,
) -> int:
    """Run the benchmark; print a table; write JSON to ``out`` when given. Returns a process exit code.

    Defaults: CPU, sizes tiny+small in fp32. On ``device="cuda"`` the default is ``full`` in bf16.
    """
    device = device or "cpu"
    if threads:
        torch.set_num_threads(int(threads))  # onnxruntime sessions get the same count
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but torch sees no GPU", file=sys.stderr)
        return 2
    on_gpu = device.startswith("cuda")
    sizes = sizes or (["full"] if on_gpu else ["tiny", "small"])
    for s in sizes:
        if s not in SIZES:
            print(f"error: unknown size {s!r} (choose from {', '.join(SIZES)})", file=sys.stderr)
            return 2
    dtype_name = dtype or ("bf16" if on_gpu else "fp32")
    if dtype_name not in DTYPES:
        print(f"error: unknown dtype {dtype_name!r} (choose from {', '.join(DTYPES)})", file=sys.stderr)
        return 2
    parts_set = set(parts or ["llm", "vision"])
    report: dict = {"benchmark": "engine", "environment": _environment(device), "runs": []}
    with tempfile.TemporaryDirectory(prefix="unimedvl-bench-") as tmp:
        cache = Path(cache_dir) if cache_dir else Path(tmp) / "onnx-cache"
        for s in sizes:
            if s == "full" and not on_gpu:
                print("note: size 'full' on CPU needs ~60 GB RAM and hours; skipped (use --device cuda)")
                report["runs"].append({"size": s, "skipped": ["full size runs on a GPU only"]})
                continue
            report["runs"].append(
                run_size(
                    s,
                    device=device,
                    dtype=DTYPES[dtype_name],
                    cache_dir=cache,
                    parts=parts_set,
                    profile=profile,
                    repeats=repeats,
                    quick=quick,
                )
            )
    print_report(report)
    if out:
        Path(out).write_text(json.dumps(report, indent=2, default=str))
        print(f"figures written to {out}")
    return 1 if any(r.get("errors") for r in report["runs"]) else 0


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--size", action="append", choices=sorted(SIZES), help="repeatable; default tiny+small (CPU)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--only", action="append", choices=["llm", "vision"], help="measure only these parts")
    ap.add_argument("--cache-dir", help="ONNX/TensorRT cache folder to keep between runs")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one ViT, VAE, decode, denoise call")
    ap.add_argument("--repeats", type=int, help="timed repeats per vision measurement")
    ap.add_argument("--threads", type=int, help="CPU threads for PyTorch and onnxruntime alike")
    ap.add_argument("--quick", action="store_true", help="smallest inputs only (smoke run)")
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return main(
        out=a.out,
        device=a.device,
        sizes=a.size,
        dtype=a.dtype,
        parts=a.only,
        cache_dir=a.cache_dir,
        profile=a.profile,
        repeats=a.repeats,
        quick=a.quick,
        threads=a.threads,
    )
