"""SigLIP-so400m NaViT vision encoder as used by UniMedVL (BAGEL), in plain PyTorch.

State-dict keys equal the checkpoint's ``vit_model.*`` keys with that prefix removed, so
``load_state_dict`` works on the stripped ``ema.safetensors`` entries. Several images are packed into
one token stream; ``cu_seqlens`` separates them and tokens never attend across images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

try:  # optional CUDA kernel; the reference uses it for every ViT call
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # ImportError, or a CUDA/ABI mismatch when the wheel is broken
    _flash_varlen = None


@dataclass
class SiglipVisionConfig:
    """The fields of ``vit_config.json`` that the model uses.

    ``num_hidden_layers`` is the number of layers actually *built*: the release loader subtracts one
    from the json value (penultimate-layer features), which ``from_json`` reproduces.
    """

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 26
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, d: dict) -> SiglipVisionConfig:
        layers = int(d.get("num_hidden_layers", 27)) - 1  # the release loader's rule
        if layers < 1:
            raise ValueError(f"vit_config num_hidden_layers must be >= 2 (one is dropped), got {layers + 1}")
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported ViT activation {act!r}; only gelu_pytorch_tanh is implemented")
        return cls(
            hidden_size=int(d.get("hidden_size", 1152)),
            intermediate_size=int(d.get("intermediate_size", 4304)),
            num_attention_heads=int(d.get("num_attention_heads", 16)),
            num_hidden_layers=layers,
            patch_size=int(d.get("patch_size", 14)),
            image_size=int(d.get("image_size", 980)),
            num_channels=int(d.get("num_channels", 3)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            hidden_act=act,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> SiglipVisionConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def patchify(
    pixels: torch.Tensor, patch_size: int = 14, max_patches_per_side: int = 70
) -> tuple[torch.Tensor, torch.Tensor]:
    """[C,H,W] pixels in [-1,1] -> (patches [N, C*p*p], position ids [N] long).

    Patches are in raster order; inside a patch the values run (pixel-row, pixel-col, channel), which is
    the layout the Linear patch embedding was converted to. Position id = row * max_patches_per_side + col
    (the reference's fixed-grid "extrapolate" scheme).
    """
    if pixels.dim() != 3:
        raise ValueError(f"patchify expects [C,H,W], got shape {tuple(pixels.shape)}")
    c, h, w = pixels.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    if gh > max_patches_per_side or gw > max_patches_per_side:
        raise ValueError(f"image {h}x{w} exceeds {max_patches_per_side} patches per side")
    patches = pixels.reshape(c, gh, p, gw, p).permute(1, 3, 2, 4, 0).reshape(gh * gw, p * p * c)
    rows = torch.arange(gh, device=pixels.device).unsqueeze(1)
    cols = torch.arange(gw, device=pixels.device).unsqueeze(0)
    pos = (rows * max_patches_per_side + cols).reshape(-1).long()
    return patches, pos


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_patches_per_side**2, cfg.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        return x + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int | None) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        if cu_seqlens is None:  # one image: full attention, graph-friendly (used by the ONNX export)
            out = _sdpa(q, k, v)
        elif _flash_varlen is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            cu = cu_seqlens.to(device=x.device, dtype=torch.int32)
            out = _flash_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=False)
        else:
            bounds = cu_seqlens.tolist()
            out = torch.cat([_sdpa(q[a:b], k[a:b], v[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        return self.out_proj(out.reshape(n, -1))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention of one segment; [T, heads, dim] in and out."""
    # 4-D [1, heads, T, dim] so CUDA picks the flash/efficient kernels rather than the math fallback
    o = F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)))
    return o.squeeze(0).transpose(0, 1)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipNaViT(nn.Module):
    """Packed SigLIP encoder: ``forward(patches [N,588], position_ids [N], cu_seqlens) -> [N, hidden]``."""

    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return patchify(pixels, self.config.patch_size, self.config.max_patches_per_side)

    def forward(
        self,
        packed_patches: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode packed images. ``cu_seqlens=None`` means the whole input is a single image."""
        vm = self.vision_model
        max_seqlen = None
        if cu_seqlens is not None:
            if cu_seqlens.numel() == 2:  # a single segment: skip the per-image split
                cu_seqlens = None
            else:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        x = vm.embeddings(packed_patches, position_ids.long())
        for layer in vm.encoder.layers:
            x = layer(x, cu_seqlens, max_seqlen)
        return vm.post_layernorm(x)
