"""Vision-encoder part of the engine benchmark: ViT+connector and VAE enc/dec, PyTorch vs onnxruntime/TensorRT.

Kept apart from the LLM part so the encoder figures can be taken
without an LLM (``python -m benchmarks.engine --only vision``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from inference.engine.vit import patchify


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str, *, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` (synchronised on CUDA), after ``warmup`` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_top(fn: Callable[[], object], device: torch.device | str, rows: int = 12) -> str:
    """One profiled call, the ops that took the most time (CUDA time on a GPU): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    key = "cpu_time_total"
    if torch.device(device).type == "cuda":
        acts.append(ProfilerActivity.CUDA)
        key = "cuda_time_total"
    with torch.inference_mode(), profile(activities=acts) as prof:
        fn()
        sync(device)
    return prof.key_averages().table(sort_by=key, row_limit=rows)


@torch.no_grad()
def materialise_random(module: nn.Module, device: torch.device | str, dtype: torch.dtype, seed: int) -> nn.Module:
    """Give a module built on the meta device real storage on ``device`` in ``dtype``, with random weights.

    Nothing is allocated in CPU RAM for a GPU target: the dtype is changed while still on meta, then
    ``to_empty`` allocates directly on the device and the values are drawn there. Buffers (computed
    tables such as RoPE frequencies) would be left uninitialised, so modules with buffers are refused.
    """
    module.to(dtype=dtype)
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() == 1 and leaf == "weight":  # norm scales
            p.fill_(1.0)
        elif leaf == "bias" or p.dim() == 1:
            p.zero_()
        else:
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.normal_(0.0, min(0.02, fan_in**-0.5), generator=gen)
    if any(True for _ in module.buffers()):
        raise ValueError("materialise_random handles parameters only; this module has buffers to compute")
    return module.eval()


@dataclass
class VisionWorkload:
    """Image sizes to time: ViT inputs (H,W multiples of 14) and VAE images (multiples of 16)."""

    vit_sizes: list[tuple[int, int]]
    vae_sizes: list[tuple[int, int]]
    repeats: int = 3


@dataclass
class VisionFigures:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)


def _vit_inputs(hw: tuple[int, int], dtype: torch.dtype, device, vit) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(hw[0] * 1000 + hw[1])
    pixels = torch.rand(3, *hw, generator=gen) * 2 - 1
    p, i = patchify(pixels, vit.config.patch_size, vit.config.max_patches_per_side)
    cu = torch.tensor([0, len(i)], dtype=torch.int32)
    return p.to(device, dtype), i.to(device), cu.to(device)


def bench_vision(
    *,
    vit: nn.Module | None,
    connector: nn.Module | None,
    vit_pos_table: torch.Tensor | None,
    ae: nn.Module | None,
    accelerated: dict[str, object],
    workload: VisionWorkload,
    device: torch.device | str,
    dtype: torch.dtype,
    profile: bool = False,
) -> VisionFigures:
    """Time each encoder under PyTorch and under every accelerated backend given in ``accelerated``.

    ``accelerated`` maps a backend label ("onnx", "tensorrt") to an ``OnnxEncoders``; each row reports
    seconds per call, the speed-up vs PyTorch and the max relative error vs the PyTorch output.
    """
    figs = VisionFigures()

    def add(component: str, size: str, torch_fn, alt_fns: dict[str, Callable[[], torch.Tensor]]) -> None:
        t_torch = time_call(torch_fn, device, repeats=workload.repeats)
        with torch.inference_mode():
            ref = torch_fn().float()
        row = {"component": component, "size": size, "torch_s": t_torch}
        for label, fn in alt_fns.items():
            try:
                t_alt = time_call(fn, device, repeats=workload.repeats)
                with torch.inference_mode():
                    out = fn().float()
                rel = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
                row |= {f"{label}_s": t_alt, f"{label}_speedup": t_torch / t_alt, f"{label}_rel_err": rel}
            except Exception as e:  # report and carry on: one failing provider must not hide the rest
                figs.notes.append(f"{component} {size} {label}: failed ({type(e).__name__}: {e})")
        figs.rows.append(row)

    if vit is not None:
        for hw in workload.vit_sizes:
            p, i, cu = _vit_inputs(hw, dtype, device, vit)
            n = len(i)

            def torch_vit(p=p, i=i, cu=cu):
                return connector(vit(p, i, cu)) + vit_pos_table[i].to(p.dtype)

            alts = {lab: (lambda e=e, p=p, i=i, cu=cu: e.vit(p, i, cu)) for lab, e in accelerated.items() if e.vit}
            add("vit+connector", f"{hw[0]}x{hw[1]} ({n} tok)", torch_vit, alts)
            if profile and hw == workload.vit_sizes[-1]:
                figs.profiles[f"vit {hw[0]}x{hw[1]}"] = profile_top(torch_vit, device)

    if ae is not None:
        f = ae.params.downsample
        for hw in workload.vae_sizes:
            gen = torch.Generator().manual_seed(hw[0] + 7 * hw[1])
            x = (torch.rand(1, 3, *hw, generator=gen) * 2 - 1).to(device, dtype)
            eps = torch.randn(1, ae.params.z_channels, hw[0] // f, hw[1] // f, generator=gen).to(device, dtype)
            z = torch.randn(1, ae.params.z_channels, hw[0] // f, hw[1] // f, generator=gen).to(device, dtype)
            size = f"{hw[0]}x{hw[1]}"

            def torch_enc(x=x, eps=eps):
                return ae.encode(x, noise=eps)

            def torch_dec(z=z):
                return ae.decode(z)

            enc_alts = {
                lab: (lambda e=e, x=x, eps=eps: e.vae_encode(x, noise=eps))
                for lab, e in accelerated.items()
                if e.vae_encode
            }
            dec_alts = {lab: (lambda e=e, z=z: e.vae_decode(z)) for lab, e in accelerated.items() if e.vae_decode}
            add("vae encode", size, torch_enc, enc_alts)
            add("vae decode", size, torch_dec, dec_alts)
            if profile and hw == workload.vae_sizes[-1]:
                figs.profiles[f"vae decode {size}"] = profile_top(torch_dec, device)
    return figs
