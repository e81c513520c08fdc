"""FLUX.1 autoencoder (the VAE UniMedVL generates and edits through), in plain PyTorch.

State-dict keys equal ``ae.safetensors`` (``encoder.*``, ``decoder.*``). ``encode`` returns the scaled and
shifted latent the LLM sees; ``decode`` takes that latent back to pixels in about [-1, 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AutoEncoderParams:
    """FLUX AE hyper-parameters; the defaults are the release values (``load_ae`` hard-codes them)."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def from_dict(cls, d: dict) -> AutoEncoderParams:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        p = cls(**known)
        p.ch_mult = [int(m) for m in p.ch_mult]
        if 2 ** (len(p.ch_mult) - 1) != p.downsample:
            raise ValueError(f"ae downsample {p.downsample} does not match ch_mult {p.ch_mult}")
        if any((p.ch * m) % 32 for m in p.ch_mult):
            raise ValueError("ae channel counts must be multiples of 32 (GroupNorm(32))")
        return p

    @classmethod
    def from_json(cls, path: str | Path) -> AutoEncoderParams:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (mid block only)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, 1, HW, C]: one head; SDPA picks a fused kernel on GPU instead of an HW x HW matrix
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(o.transpose(2, 3).reshape(b, c, h, w))


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` list plus an optional ``downsample``/``upsample``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        in_mult = [1, *p.ch_mult]
        self.down = nn.ModuleList()
        c = p.ch
        for i, mult in enumerate(p.ch_mult):
            level = _Level()
            c_in, c_out = p.ch * in_mult[i], p.ch * mult
            for _ in range(p.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out))
                c_in = c_out
            if i != len(p.ch_mult) - 1:
                level.downsample = Downsample(c_in)
            self.down.append(level)
            c = c_in
        self.mid = _Mid(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        c = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, c, 3, padding=1)
        self.mid = _Mid(c)
        levels: list[_Level] = []
        for i in reversed(range(len(p.ch_mult))):
            level = _Level()
            c_out = p.ch * p.ch_mult[i]
            for _ in range(p.num_res_blocks + 1):
                level.block.append(ResnetBlock(c, c_out))
                c = c_out
            if i != 0:
                level.upsample = Upsample(c)
            levels.insert(0, level)  # indexed by resolution level; level len-1 runs first
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, p.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxAutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams | None = None) -> None:
        super().__init__()
        self.params = params or AutoEncoderParams()
        self.encoder = Encoder(self.params)
        self.decoder = Decoder(self.params)

    @property
    def scale_factor(self) -> float:
        return self.params.scale_factor

    @property
    def shift_factor(self) -> float:
        return self.params.shift_factor

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,3,H,W] in [-1,1] -> (mean, logvar), each [B, z, H/8, W/8] (unscaled posterior)."""
        moments = self.encoder(x.to(self.encoder.conv_in.weight.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def scale_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.params.scale_factor * (z - self.params.shift_factor)

    def sample_posterior(
        self,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The reference's ``DiagonalGaussian``: mean + exp(logvar/2)*eps, then scale/shift.

        ``noise`` injects eps (golden vectors, reproducible edits); ``sample=False`` takes the mean.
        """
        if not sample:
            return self.scale_latent(mean)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
        z = mean + torch.exp(0.5 * logvar) * noise.to(device=mean.device, dtype=mean.dtype)
        return self.scale_latent(z)

    def encode(
        self,
        x: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pixels [B,3,H,W] in [-1,1] -> scaled latent [B, z, H/8, W/8], as ``ae.encode`` in the reference."""
        mean, logvar = self.encode_moments(x)
        return self.sample_posterior(mean, logvar, noise=noise, sample=sample, generator=generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> pixels [B,3,H,W] (about [-1,1], not clamped)."""
        z = z.to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)
