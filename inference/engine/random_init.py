"""Random-weight models of any configured size: the tiny demo model and benchmark builds.

Weights are drawn from a fixed seed, one stream per parameter name (deterministic), directly on the chosen init
device from the meta device (nothing big is allocated twice):
linear/conv weights N(0, 1/fan_in), biases N(0, 0.02^2), norm scales 1 + N(0, 0.1^2), token embeddings
N(0, 1), the ViT position table N(0, 0.5^2), and the exact 2-D sin-cos tables for the fixed position tables.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from .heads import PositionEmbedding
from .tokenizer import SPECIAL_TOKENS

TINY_SEED = 0

# The golden tiny-v1 shapes (README section 2), with the vocabulary of the built-in byte-level tokenizer.
TINY_CONFIG: dict = {
    "llm": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 256 + len(SPECIAL_TOKENS),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 32768,
    },
    "vit": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 3,  # json value; two layers are built
        "patch_size": 14,
        "image_size": 980,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
    },
    "ae": {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "z_channels": 16, "downsample": 8},
    "bagel": {"latent_patch_size": 2, "max_latent_size": 32, "vit_max_num_patch_per_side": 70},
}


def _is_norm(name: str) -> bool:
    parts = name.split(".")
    return any("norm" in p for p in parts[:-1])


@torch.no_grad()
def materialise(module: nn.Module, *, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Allocate a meta-built module on ``device`` and fill it deterministically."""
    module.to(dtype=dtype)  # still on meta: no copy
    module.to_empty(device=device)
    gen = torch.Generator(device=device)
    for name, p in module.named_parameters():
        # one stream per tensor name: a model built without some parts has the same values for the rest
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("pos_embed"):
            continue
        if _is_norm(name) and leaf == "weight":
            p.normal_(0.0, 0.1, generator=gen).add_(1.0)
        elif leaf == "bias":
            p.normal_(0.0, 0.02, generator=gen)
        elif "embed_tokens" in name:
            p.normal_(0.0, 1.0, generator=gen)
        elif "position_embedding" in name:
            p.normal_(0.0, 0.5, generator=gen)
        else:
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.normal_(0.0, fan_in**-0.5, generator=gen)
    for m in module.modules():
        if isinstance(m, PositionEmbedding):
            m.reset_sincos()
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
