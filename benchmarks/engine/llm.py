"""LLM and generation part of the engine benchmark, driven through ``inference.engine.Engine``.

Measured at the id/tensor level of the engine (random weights have no tokenizer): prefill = one cached text
block of L tokens (and a ViT image block + text, the VQA prefill), decode = ``Engine.decode_text`` greedy,
denoising = ``Engine.sample_image_latent`` with the reference T2I settings (text CFG on every step of a short
schedule). On a GPU with ``full_image_steps`` it also times one whole 50-step text-to-image with CFG
(prefill + sampler + VAE decode) and the peak memory of generation and of an understanding-only engine.
"""

from __future__ import annotations

import gc
import time

import torch

from benchmarks.engine.vision import profile_top, sync
from inference.engine import Engine, build_random
from inference.engine.sampler import SamplerSettings


def build_engine(cfg: dict, *, device: str, dtype: torch.dtype, seed: int, parts: str) -> tuple[Engine | None, str]:
    """(engine, "") or (None, reason). Weights are drawn on ``device`` from the meta device (no CPU copy)."""
    try:
        return build_random(cfg, device=device, dtype=dtype, seed=seed, parts=parts), ""
    except torch.cuda.OutOfMemoryError as e:
        return None, f"out of GPU memory building the {parts} engine ({e})"


def _ids(n: int, vocab: int, specials: set[int], seed: int) -> list[int]:
    """n prompt ids drawn from the vocabulary, avoiding the four control tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g).tolist()
    return [i if i not in specials else (i + 1) % vocab for i in ids]


def _specials(engine: Engine) -> set[int]:
    t = engine.model.tokens
    return {t.bos_token_id, t.eos_token_id, t.start_of_image, t.end_of_image}


def _timed(fn, device: str) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def _vit_image_hw(work: dict) -> tuple[int, int]:
    """The largest ViT size of the workload: the VQA prefill image."""
    return max(work["vision"].vit_sizes, key=lambda hw: hw[0] * hw[1])


@torch.inference_mode()
def _prefill(engine: Engine, ids: list[int], pixels: torch.Tensor | None):
    ctx = engine.new_context()
    if pixels is not None:
        engine.model.append_vit_tokens(ctx, engine.vit_tokens([pixels])[0])
    engine.model.append_text(ctx, ids)
    return ctx


@torch.inference_mode()
def _decode(engine: Engine, ctx, n: int):
    return engine.decode_text(ctx, max_new_tokens=n)


def _t2i_settings(steps: int) -> SamplerSettings:
    # Engine.generate_image defaults (the reference gen_image values)
    return SamplerSettings(steps=steps, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.5,
                           cfg_interval=(0.4, 1.0), cfg_renorm_type="global")  # fmt: skip


@torch.inference_mode()
def _generate(engine: Engine, ids: list[int], hw: tuple[int, int], steps: int, *, decode: bool):
    """The Engine.generate_image flow at id level: gen = text, cfg_text = empty, cfg_img = gen."""
    gen = engine.new_context()
    engine.model.append_text(gen, ids)
    h, w = engine.grid_for(*hw)
    dim = engine.model.latent_patch**2 * engine.model.latent_channels
    noise = torch.randn(h * w, dim, generator=torch.Generator().manual_seed(0))
    x = engine.sample_image_latent(
        gen, engine.new_context(), gen, noise, hw, _t2i_settings(steps), img_same_as_gen=True
    )
    return engine.latent_to_image(x, hw) if decode else x


def _row(measure: str, value: float, unit: str, detail: str = "") -> dict:
    return {"measure": measure, "value": value, "unit": unit, "detail": detail}


def bench_llm(engine: Engine, cfg: dict, work: dict, *, device: str, profile: bool, notes: list[str]) -> dict:
    rows: list[dict] = []
    profiles: dict[str, str] = {}
    vocab = cfg["llm"]["vocab_size"]
    specials = _specials(engine)
    prompt = _ids(work["prefill_tokens"], vocab, specials, seed=1)
    on_gpu = device.startswith("cuda")

    # warm-up: first calls pay allocator growth, kernel selection and lazy imports
    _decode(engine, _prefill(engine, prompt[:8], None), 2)

    # prefill: one text block; the context is rebuilt per repeat
    times = [_timed(lambda: _prefill(engine, prompt, None), device)[1] for _ in range(3)]
    t = sorted(times)[1]
    n_text = len(prompt) + 2  # <|im_start|> ... <|im_end|>
    rows.append(_row("prefill (text)", n_text / t, " tok/s", f"{n_text} tokens in {t * 1e3:.1f} ms"))

    hw = _vit_image_hw(work)
    gen = torch.Generator().manual_seed(2)
    pixels = (torch.rand(3, *hw, generator=gen) * 2 - 1).to(engine.device)
    _prefill(engine, prompt[:8], pixels)  # warm the ViT path at this size
    ctx, t = _timed(lambda: _prefill(engine, prompt, pixels), device)
    rows.append(_row("prefill (image + text)", ctx.kv_len / t, " tok/s",
                     f"{hw[0]}x{hw[1]} image + {n_text} text = {ctx.kv_len} tokens in {t * 1e3:.1f} ms"))  # fmt: skip

    # decode after the VQA prefill: a report-length answer on the GPU, a short one on CPU
    n_dec = work["decode_tokens"]
    res, t = _timed(lambda: _decode(engine, ctx, n_dec), device)
    steps = len(res.token_ids) + int(res.stopped_on_eos)
    if res.stopped_on_eos:
        notes.append(f"decode stopped on <|im_end|> after {steps} of {n_dec} steps (random weights)")
    ctx_len = ctx.kv_len - steps - 1
    detail = f"{steps} tokens after a {ctx_len}-token context, {t / steps * 1e3:.1f} ms/token"
    rows.append(_row("decode (1 stream)", steps / t, " tok/s", detail))
    if profile:
        ctx2 = _prefill(engine, prompt, None)
        profiles["decode 8 tokens"] = profile_top(lambda: _decode(engine, ctx2, 8), device)

    # denoising: steps/s at the workload size, with text CFG on every evaluated step
    if engine.model.with_gen:
        img_hw = work["image_hw"]
        n_steps = work["denoise_steps"]
        short = prompt[:32]
        _generate(engine, short, img_hw, 2, decode=False)
        _, t = _timed(lambda: _generate(engine, short, img_hw, n_steps, decode=False), device)
        evals = n_steps - 1  # sigma = 0 is never evaluated
        n_tok = engine.grid_for(*img_hw)[0] * engine.grid_for(*img_hw)[1]
        rows.append(_row("denoising", evals / t, " steps/s",
                         f"{img_hw[0]}x{img_hw[1]} ({n_tok} latent tokens), CFG text pass each step, "
                         f"{t / evals * 1e3:.0f} ms/step"))  # fmt: skip
        if profile:
            profiles[f"denoise {img_hw[0]}x{img_hw[1]} 2 steps"] = profile_top(
                lambda: _generate(engine, short, img_hw, 2, decode=False), device
            )
        full_steps = work.get("full_image_steps")
        if on_gpu and full_steps:
            torch.cuda.reset_peak_memory_stats()
            try:
                _, t = _timed(lambda: _generate(engine, short, img_hw, full_steps, decode=True), device)
            except torch.cuda.OutOfMemoryError as e:  # keep the figures measured so far
                notes.append(f"{full_steps}-step {img_hw[0]}x{img_hw[1]} image: out of GPU memory ({e})")
                torch.cuda.empty_cache()
                return {"rows": rows, "profiles": profiles}
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows.append(_row(f"image {img_hw[0]}x{img_hw[1]}, {full_steps} steps, CFG", t, " s",
                             "text prefill + sampler + VAE decode (PyTorch)"))  # fmt: skip
            rows.append(_row("peak GPU memory, generation", peak, " GiB", "torch.cuda.max_memory_allocated"))
    return {"rows": rows, "profiles": profiles}


def peak_memory_vqa_only(cfg: dict, *, device: str, dtype: torch.dtype, work: dict) -> float | str:
    """Peak GPU memory (GiB) of an understanding-only engine answering about one large image."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine, why = build_engine(cfg, device=device, dtype=dtype, seed=0, parts="understanding")
    if engine is None:
        return f"not measured: {why}"
    prompt = _ids(work["prefill_tokens"], cfg["llm"]["vocab_size"], _specials(engine), seed=1)
    hw = _vit_image_hw(work)
    pixels = (torch.rand(3, *hw, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(engine.device)
    ctx = _prefill(engine, prompt, pixels)
    _decode(engine, ctx, min(64, work["decode_tokens"]))
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del engine, ctx
    gc.collect()
    torch.cuda.empty_cache()
    return peak
