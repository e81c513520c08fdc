"""Rectified-flow Euler sampler with timestep shift, text/image CFG, CFG interval and renormalisation (spec 3.2).

Convention: x_sigma = (1 - sigma) x0 + sigma eps and v ~ eps - x0, so each step is ``x <- x - v * dt``.
The CFG branches of a step run as one batch (their contexts padded once per image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .model import Context, UniMedVL

RENORM_TYPES = ("global", "channel", "text_channel")
EPS = 1e-8


def shifted_schedule(steps: int, shift: float) -> torch.Tensor:
    """sigma_i = shift*tau_i / (1 + (shift-1)*tau_i), tau = linspace(1, 0, steps), float32 on the CPU."""
    if steps < 2:
        raise InputError(f"steps must be >= 2 (got {steps}); the sampler evaluates steps-1 times")
    tau = torch.linspace(1, 0, steps, dtype=torch.float32)
    return shift * tau / (1 + (shift - 1) * tau)


def _renorm(c: torch.Tensor, w: torch.Tensor, per_token: bool, r_min: float) -> torch.Tensor:
    if per_token:
        nc, nw = c.norm(dim=-1, keepdim=True), w.norm(dim=-1, keepdim=True)
    else:
        nc, nw = c.norm(), w.norm()
    return w * (nc / (nw + EPS)).clamp(min=r_min, max=1.0)


def combine_cfg(
    c: torch.Tensor,
    u_text: torch.Tensor | None,
    u_img: torch.Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str = "global",
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """The reference's CFG combination. ``u_img`` is only used when ``img_scale > 1``; ``text_scale <= 1`` -> c."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {renorm_type!r}")
    if text_scale <= 1.0 or u_text is None:
        return c
    w = u_text + text_scale * (c - u_text)
    use_img = img_scale > 1.0 and u_img is not None
    if renorm_type == "text_channel":
        w = _renorm(c, w, True, renorm_min)
        return u_img + img_scale * (w - u_img) if use_img else w
    if use_img:
        w = u_img + img_scale * (w - u_img)
    return _renorm(c, w, renorm_type == "channel", renorm_min)


@dataclass
class SamplerSettings:
    """Defaults: the reference entry point ``interleave_inference`` (inferencer.py:561-567)."""

    steps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 3.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0

    def validate(self) -> None:
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise InputError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        if self.steps < 2:
            raise InputError(f"steps must be >= 2, got {self.steps}")
        if self.timestep_shift <= 0:
            raise InputError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        lo, hi = self.cfg_interval
        if not (0.0 <= lo <= hi <= 1.0):
            raise InputError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")


@dataclass
class SampleTrace:
    """Per-step record (parity and debugging): sigma, CFG active, x before the step, combined velocity."""

    t: list[float] = field(default_factory=list)
    cfg_active: list[bool] = field(default_factory=list)
    x: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)


def sample_latent(
    model: UniMedVL,
    gen: Context,
    cfg_text: Context | None,
    cfg_img: Context | None,
    noise: torch.Tensor,
    grid: tuple[int, int],
    settings: SamplerSettings,
    *,
    img_same_as_gen: bool = False,
    trace: SampleTrace | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` [N, 64] (token layout) on an h x w latent-token grid; returns the final x [N, 64] fp32.

    ``img_same_as_gen``: the cfg_img context equals the gen context (text-to-image), so u_img = c exactly and
    its pass is skipped.
    """
    settings.validate()
    h, w = grid
    n = h * w
    x = noise.to(model.device, torch.float32).reshape(n, -1)
    pos = model.latent_position_ids(h, w)
    sigma = shifted_schedule(settings.steps, settings.timestep_shift)
    sigma_dev = sigma.to(model.device)
    dts = sigma_dev[:-1] - sigma_dev[1:]
    use_text = settings.cfg_text_scale > 1.0 and cfg_text is not None
    use_img = use_text and settings.cfg_img_scale > 1.0 and (cfg_img is not None or img_same_as_gen)
    img_branch = use_img and not img_same_as_gen

    branches = [gen] + ([cfg_text] if use_text else []) + ([cfg_img] if img_branch else [])
    lo, hi = settings.cfg_interval
    active = [lo < float(s) <= hi for s in sigma[:-1]]
    full = model.query_batch(branches, n + 2) if len(branches) > 1 and any(active) else None
    cond_only = model.query_batch([gen], n + 2) if not all(active) or full is None else None

    for i in range(settings.steps - 1):
        t = sigma_dev[i : i + 1]
        on = active[i] and full is not None
        vs = model.velocity(full if on else cond_only, x, t, pos)
        c = vs[0]
        if on:
            u_t = vs[1]
            u_i = (c if img_same_as_gen else vs[2]) if use_img else None
            v = combine_cfg(c, u_t, u_i, settings.cfg_text_scale, settings.cfg_img_scale,
                            settings.cfg_renorm_type, settings.cfg_renorm_min)  # fmt: skip
        else:
            v = c
        if trace is not None:
            trace.t.append(float(sigma[i]))
            trace.cfg_active.append(on)
            trace.x.append(x.clone())
            trace.v.append(v.clone())
        x = x - v * dts[i]
        if progress is not None:
            progress(i + 1, settings.steps - 1)
    return x


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[1, 3, H, W] in about [-1, 1] -> [H, W, 3] uint8, truncating like the reference."""
    return ((img[0].float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)
