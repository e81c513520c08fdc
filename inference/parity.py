"""Golden-vector parity runner: ``python -m inference.parity DIR`` (exit 0 iff every case passes).

Reads ``DIR/manifest.json``, loads ``DIR/<checkpoint dir>`` with the engine (float32, CPU unless
``--device``), runs every case from its recorded inputs and parameters, and compares every ``output``
tensor (and the intermediates the engine exposes) with the recorded values:
float atol = rtol = 1e-4 (``|a-b| <= atol + rtol*|b|``), integers exactly, uint8 images within 1.

Cases are recognised by name (vae, vit, und, gen_step, t2i*, edit*) or, for other names, by the tensors
they carry. Shapes, seeds, step counts and CFG settings all come from the manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from inference.engine import Engine, load_engine
from inference.engine.model import latent_to_tokens, tokens_to_latent
from inference.engine.sampler import SamplerSettings, SampleTrace, combine_cfg
from inference.engine.transforms import to_model_tensor
from inference.engine.vit import patchify

ATOL = RTOL = 1e-4
UINT8_TOL = 1


@dataclass
class CaseResult:
    name: str
    passed: bool = True
    worst: tuple[str, float] = ("", 0.0)  # float tensor with the largest absolute error
    worst_u8: int = 0  # largest uint8 pixel difference
    failures: list[str] = field(default_factory=list)
    compared: int = 0
    seconds: float = 0.0


def compare(res: CaseResult, name: str, got: torch.Tensor, want: torch.Tensor, role: str) -> None:
    res.compared += 1
    got = got.detach().cpu()
    if tuple(got.shape) != tuple(want.shape):
        res.passed = False
        res.failures.append(f"{name}: shape {list(got.shape)} != expected {list(want.shape)}")
        return
    if want.dtype == torch.uint8:
        err = (got.to(torch.int32) - want.to(torch.int32)).abs().max().item() if want.numel() else 0
        ok = err <= UINT8_TOL
    elif not want.dtype.is_floating_point:
        err = (got.to(torch.int64) - want.to(torch.int64)).abs().max().item() if want.numel() else 0
        ok = err == 0
    else:
        g, w = got.double(), want.double()
        if not torch.isfinite(g).all():
            res.passed = False
            res.failures.append(f"{name}: non-finite values")
            return
        diff = (g - w).abs()
        err = diff.max().item() if diff.numel() else 0.0
        ok = bool((diff <= ATOL + RTOL * w.abs()).all())
    if want.dtype == torch.uint8:
        res.worst_u8 = max(res.worst_u8, int(err))
    elif want.dtype.is_floating_point and err >= res.worst[1]:
        res.worst = (name, float(err))
    if not ok:
        res.passed = False
        res.failures.append(f"{name} ({role}): max abs error {err:.3g} over tolerance")


class CaseRunner:
    def __init__(self, engine: Engine, root: Path, case: dict) -> None:
        self.engine = engine
        self.m = engine.model
        self.case = case
        self.params = case.get("params", {})
        self.specs = case["tensors"]
        self.t = load_file(str(root / case["file"]))
        self.out: dict[str, torch.Tensor] = {}

    # helpers
    def dev(self, name: str) -> torch.Tensor:
        return self.t[name].to(self.engine.device)

    def pixels_from_u8(self, float_name: str) -> None:
        """The float input must be what the engine's conversion makes of the uint8 image."""
        u8 = f"{float_name}_u8"
        if u8 in self.t:
            pix = to_model_tensor_hwc(self.t[u8])
            want = self.t[float_name]
            self.out[f"{float_name} (from {u8})"] = pix.reshape(want.shape)

    def settings(self) -> SamplerSettings:
        p = self.params
        return SamplerSettings(
            steps=int(p["num_timesteps"]),
            timestep_shift=float(p["timestep_shift"]),
            cfg_text_scale=float(p.get("cfg_text_scale", 1.0)),
            cfg_img_scale=float(p.get("cfg_img_scale", 1.0)),
            cfg_interval=tuple(p.get("cfg_interval", (0.0, 1.0))),
            cfg_renorm_type=p.get("cfg_renorm_type", "global"),
            cfg_renorm_min=float(p.get("cfg_renorm_min", 0.0)),
        )

    def size(self) -> tuple[int, int]:
        return int(self.params["H"]), int(self.params["W"])

    def record_sampling(self, trace: SampleTrace, x: torch.Tensor, size: tuple[int, int]) -> None:
        self.out["step_t"] = torch.tensor(trace.t, dtype=torch.float32)
        self.out["step_cfg_active"] = torch.tensor([int(a) for a in trace.cfg_active])
        self.out["step_x"] = torch.stack(trace.x)
        self.out["step_v"] = torch.stack(trace.v)
        self.out["final_latent"] = x
        h, w = self.engine.grid_for(*size)
        m = self.m
        self.out["decode_in"] = tokens_to_latent(x, h, w, m.latent_patch, m.latent_channels)
        self.out["latent_position_ids"] = m.latent_position_ids(h, w)
        img = self.engine.latent_to_image(x, size)
        self.out["image_float"] = img
        self.out["image_u8"] = ((img[0].float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)

    # cases
    def run_vae(self) -> None:
        e, p = self.engine, self.params
        vae = e._require_vae()
        ap = vae.params
        for key, have in (("scale_factor", ap.scale_factor), ("shift_factor", ap.shift_factor)):
            if key in p and abs(float(p[key]) - have) > 1e-12:
                raise AssertionError(f"case expects {key}={p[key]}, checkpoint AE has {have}")
        x = self.dev("image")
        self.pixels_from_u8("image")
        mean, logvar = vae.encode_moments(x)
        self.out["enc_moments"] = torch.cat([mean, logvar], dim=1)
        if "eps" in self.t:
            eps = self.dev("eps")
            self.out["z_sample"] = mean + torch.exp(0.5 * logvar) * eps
            self.out["z_scaled"] = e.vae_encode(x[0], eps).unsqueeze(0)
        self.out["z_mean_scaled"] = e.vae_encode(x[0], None).unsqueeze(0)
        if "decode_in" in self.t:
            z = self.dev("decode_in")
            self.out["decode_unscaled"] = z / ap.scale_factor + ap.shift_factor
            self.out["decode_out"] = e.vae_decode(z)
        if "z_scaled" in self.t:
            self.out["roundtrip_out"] = e.vae_decode(self.dev("z_scaled"))

    def run_vit(self) -> None:
        m = self.m
        side = int(self.params.get("vit_max_num_patch_per_side", m.bagel_config.vit_max_num_patch_per_side))
        ps = int(self.params.get("patch_size", m.vit_config.patch_size))
        names = sorted((k for k in self.t if k.startswith("image") and k[5:].isdigit()), key=lambda k: int(k[5:]))
        images = [self.dev(k) for k in names]
        for k, img in zip(names, images, strict=True):
            self.pixels_from_u8(k)
            patches, pos = patchify(img, ps, side)
            self.out[f"{k}_patches"], self.out[f"{k}_position_ids"] = patches, pos
        packed, pos, cu = self.dev("packed_patches"), self.dev("packed_position_ids"), self.dev("cu_seqlens")
        self.out["vit_embeddings"] = m.vit_model.vision_model.embeddings(packed, pos)
        feats = m.vit_model(packed, pos, cu.to(torch.int32))
        self.out["vit_out"] = feats
        self.out["connector_out"] = m.connector(feats)
        self.out["vit_pos_embed"] = m.vit_pos_embed(pos)
        # the engine path: images -> patchify -> one packed ViT call -> LLM tokens
        self.out["llm_vit_tokens"] = torch.cat(self.engine.vit_tokens(images))

    def run_und(self) -> None:
        e, m = self.engine, self.m
        ctx = e.new_context()
        hidden = []
        if "sys_ids" in self.t:
            hidden.append(m.append_text(ctx, self.t["sys_ids"].tolist()))
        img_names = [k for k in ("image",) if k in self.t] + sorted(
            k for k in self.t if k.startswith("image") and k[5:].isdigit()
        )
        for k in img_names:
            self.pixels_from_u8(k)
            img = self.dev(k)
            patches, pos = patchify(img, m.vit_config.patch_size, m.bagel_config.vit_max_num_patch_per_side)
            self.out["vit_patches" if k == "image" else f"{k}_patches"] = patches
            self.out["vit_position_ids" if k == "image" else f"{k}_position_ids"] = pos
            hidden.append(m.append_vit_tokens(ctx, e.vit_tokens([img])[0]))
        hidden.append(m.append_text(ctx, self.t["question_ids"].tolist()))
        for i, h in enumerate(hidden):
            self.out[f"block{i}_final_hidden"] = h
        self.layout(ctx)
        for layer in range(m.llm_config.num_hidden_layers):
            self.out[f"cache_k_layer{layer}"] = ctx.cache.k[layer, : ctx.kv_len]
            self.out[f"cache_v_layer{layer}"] = ctx.cache.v[layer, : ctx.kv_len]
        self.out["prefill_last_logits"] = m.logits(hidden[-1][-1])
        self.check_state("kv_len_after_prefill", ctx.kv_len)
        self.check_state("rope_after_prefill", ctx.rope)
        r0 = ctx.rope
        steps = int(self.params["max_length"])
        if self.params.get("do_sample", False):
            raise AssertionError("sampled decoding cases are not reproducible across implementations")
        res = e.decode_text(ctx, max_new_tokens=steps, record=True)
        eos = m.tokens.eos_token_id
        self.out["decode_input_tokens"] = torch.tensor(res.fed_tokens)
        self.out["decode_step_logits"] = torch.stack(res.step_logits)
        self.out["decode_next_tokens"] = torch.tensor(res.token_ids + ([eos] if res.stopped_on_eos else []))
        self.out["decode_step_rope_pos"] = torch.arange(r0, r0 + len(res.step_logits))
        if "stopped_on_eos" in self.params and bool(self.params["stopped_on_eos"]) != res.stopped_on_eos:
            self.mismatch(f"stopped_on_eos {res.stopped_on_eos} != expected {self.params['stopped_on_eos']}")

    def layout(self, ctx) -> None:
        ids, rope, kind = [], [], []
        for b in ctx.blocks:
            if b.kind == "text":
                ids += b.token_ids
                rope += list(range(b.rope_start, b.rope_start + b.n_tokens))
                kind += [0] * b.n_tokens
            else:
                ids += [b.token_ids[0]] + [-1] * (b.n_tokens - 2) + [b.token_ids[1]]
                rope += [b.rope_start] * b.n_tokens
                kind += [1 if b.kind == "vit" else 2] * b.n_tokens
        self.out["seq_token_ids"] = torch.tensor(ids)
        self.out["seq_rope_pos"] = torch.tensor(rope)
        self.out["seq_block_kind"] = torch.tensor(kind)

    def check_state(self, key: str, value: int) -> None:
        if key in self.params and int(self.params[key]) != value:
            self.mismatch(f"{key} = {value}, expected {self.params[key]}")

    def check_ctx(self, key: str, ctx) -> None:
        if key in self.params and dict(self.params[key]) != ctx.state():
            self.mismatch(f"{key} = {ctx.state()}, expected {self.params[key]}")

    def mismatch(self, msg: str) -> None:
        self.state_failures.append(msg)

    def run_gen_step(self) -> None:
        e, m = self.engine, self.m
        gen = e.new_context()
        m.append_text(gen, self.t["prompt_ids"].tolist())
        uncond = e.new_context()
        self.check_state("cond_kv_len", gen.kv_len)
        self.check_state("cond_rope", gen.rope)
        h, w = e.grid_for(*self.size())
        n = h * w
        x, t = self.dev("x_t"), self.dev("timestep").reshape(1).float()
        pos = m.latent_position_ids(h, w)
        self.out["latent_position_ids"] = pos
        self.out["time_embed"] = m.time_embedder(t)
        self.out["latent_token_embed"] = m.latent_embed(x, t, pos)
        qb = m.query_batch([gen, uncond], n + 2)
        self.out["query_rope_pos"] = qb.positions[0]
        self.out["query_rope_pos_cfg_text"] = qb.positions[1]
        vs = m.velocity(qb, x, t, pos)
        c, u = vs[0], vs[1]
        self.out["v_cond"], self.out["v_uncond_text"] = c, u
        for name, combo in self.params.get("combos", {}).items():
            self.out[name] = combine_cfg(
                c, u, None, float(combo.get("cfg_text_scale", 1.0)), float(combo.get("cfg_img_scale", 1.0)),
                combo.get("cfg_renorm_type", "global"), float(combo.get("cfg_renorm_min", 0.0)),
            )  # fmt: skip

    def run_t2i(self) -> None:
        e, m = self.engine, self.m
        gen = e.new_context()
        m.append_text(gen, self.t["prompt_ids"].tolist())
        trace = SampleTrace()
        size = self.size()
        x = e.sample_image_latent(gen, e.new_context(), gen, self.t["init_noise"], size, self.settings(),
                                  img_same_as_gen=True, trace=trace)  # fmt: skip
        self.record_sampling(trace, x, size)

    def run_edit(self) -> None:
        e, m = self.engine, self.m
        for k in ("vae_image", "vit_image"):
            self.pixels_from_u8(k)
        gen = e.new_context()
        z = e.vae_encode(self.dev("vae_image"), self.dev("vae_eps") if "vae_eps" in self.t else None)
        self.out["vae_cond_latent"] = z.unsqueeze(0)
        self.out["vae_cond_tokens"] = latent_to_tokens(z, m.latent_patch)
        p = m.latent_patch
        self.out["vae_cond_position_ids"] = m.latent_position_ids(z.shape[-2] // p, z.shape[-1] // p)
        vit_img = self.dev("vit_image")
        vpatch, vpos = patchify(vit_img, m.vit_config.patch_size, m.bagel_config.vit_max_num_patch_per_side)
        self.out["vit_patches"], self.out["vit_position_ids"] = vpatch, vpos
        h0 = m.append_vae_latent(gen, z)
        h1 = m.append_vit_tokens(gen, e.vit_tokens([vit_img])[0])
        cfg_text = gen.fork()
        h2 = m.append_text(gen, self.t["prompt_ids"].tolist())
        cfg_img = e.new_context()
        m.append_text(cfg_img, self.t["prompt_ids"].tolist())
        for i, h in enumerate((h0, h1, h2)):
            self.out[f"block{i}_final_hidden"] = h
        self.check_ctx("gen_ctx", gen)
        self.check_ctx("cfg_text_ctx", cfg_text)
        self.check_ctx("cfg_img_ctx", cfg_img)
        trace = SampleTrace()
        size = self.size()
        x = e.sample_image_latent(gen, cfg_text, cfg_img, self.t["init_noise"], size, self.settings(), trace=trace)
        self.record_sampling(trace, x, size)

    def kind(self) -> str:
        name, t = self.case["name"], self.t
        for prefix in ("vae", "vit", "und", "gen_step", "t2i", "edit"):
            if name == prefix or name.startswith(prefix + "_"):
                return prefix
        if "enc_moments" in t or ("decode_in" in t and "eps" in t):
            return "vae"
        if "packed_patches" in t:
            return "vit"
        if "decode_step_logits" in t:
            return "und"
        if "v_cond" in t:
            return "gen_step"
        if "vae_image" in t and "init_noise" in t:
            return "edit"
        if "init_noise" in t and "prompt_ids" in t:
            return "t2i"
        raise AssertionError(f"case {name!r}: unknown kind (no runner recognises its tensors)")

    def run(self) -> CaseResult:
        res = CaseResult(self.case["name"])
        self.state_failures: list[str] = []
        t0 = time.perf_counter()
        try:
            runner: Callable[[], None] = getattr(self, f"run_{self.kind()}")
            with torch.inference_mode():
                runner()
        except Exception as exc:  # a crashing case is a failing case, named, and the others still run
            res.passed = False
            res.failures.append(f"error: {type(exc).__name__}: {exc}")
            res.seconds = time.perf_counter() - t0
            return res
        for name, spec in self.specs.items():
            role = spec.get("role", "")
            if role in ("output", "output_uint8"):
                if name not in self.out:
                    res.passed = False
                    res.failures.append(f"{name}: output not produced by the runner")
                    continue
            elif role != "intermediate" or name not in self.out:
                continue
            compare(res, name, self.out[name], self.t[name], role)
        for name, got in self.out.items():  # conversions of the inputs (uint8 -> model pixels)
            if " (from " in name:
                compare(res, name, got, self.t[name.split(" ")[0]], "input")
        if self.state_failures:
            res.passed = False
            res.failures += self.state_failures
        res.seconds = time.perf_counter() - t0
        return res


def to_model_tensor_hwc(u8: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    return to_model_tensor(Image.fromarray(u8.numpy()))


def run(root: Path, device: str = "cpu", only: list[str] | None = None) -> list[CaseResult]:
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: DIR must be a golden-vector set")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("dtype", "float32") != "float32":
        raise ValueError(f"golden set dtype {manifest.get('dtype')} is not supported (float32 tolerances)")
    ckpt = root / manifest.get("checkpoint", {}).get("dir", "checkpoint")
    if torch.device(device).type == "cuda":  # the vectors are exact fp32: no TF32 matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    engine = load_engine(str(ckpt), device=device, dtype=torch.float32, attention="sdpa")
    results = []
    for case in manifest["cases"]:
        if only and case["name"] not in only:
            continue
        results.append(CaseRunner(engine, root, case).run())
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.parity", description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="golden set folder (with manifest.json)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--case", action="append", help="run only this case (repeatable)")
    args = ap.parse_args(argv)
    try:
        results = run(args.dir, args.device, args.case)
    except Exception as exc:
        print(f"parity: cannot run {args.dir}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    width = max((len(r.name) for r in results), default=4)
    for r in results:
        status = "PASS" if r.passed else "FAIL"
        u8 = f"  uint8 max diff {r.worst_u8}" if r.worst_u8 else ""
        print(f"{status}  {r.name:<{width}}  max abs err {r.worst[1]:.3e} ({r.worst[0] or '-'}){u8}  "
              f"{r.compared} tensors  {r.seconds:.2f}s")  # fmt: skip
        for f in r.failures:
            print(f"      {r.name}: {f}")
    n_fail = sum(not r.passed for r in results)
    print(f"{len(results) - n_fail}/{len(results)} cases passed (atol=rtol={ATOL:g}, uint8 within {UINT8_TOL})")
    return 0 if results and n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
