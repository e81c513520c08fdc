"""Build benchmark models with random weights straight on the target device (meta device first)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.engine.vision import materialise_random
from inference.engine.vae import AutoEncoderParams, FluxAutoEncoder
from inference.engine.vit import SiglipNaViT, SiglipVisionConfig


class MLPConnector(nn.Module):
    """fc1 -> tanh-GELU -> fc2, the release connector's shape (used when no engine supplies one)."""

    def __init__(self, vit_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vit_hidden, llm_hidden)
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@dataclass
class VisionModules:
    vit_model: SiglipNaViT
    connector: nn.Module
    vit_pos_embed: torch.Tensor
    vae: FluxAutoEncoder


def build_vision_modules(cfg: dict, *, device: str, dtype: torch.dtype, seed: int) -> VisionModules:
    """ViT, connector, ViT position table and VAE of one size, random, allocated only on ``device``."""
    vit_cfg = SiglipVisionConfig.from_dict(cfg["vit"])
    llm_hidden = cfg["llm"]["hidden_size"]
    with torch.device("meta"):
        vit = SiglipNaViT(vit_cfg)
        connector = MLPConnector(vit_cfg.hidden_size, llm_hidden)
        ae = FluxAutoEncoder(AutoEncoderParams.from_dict(cfg["ae"]))
    materialise_random(vit, device, dtype, seed)
    materialise_random(connector, device, dtype, seed + 1)
    materialise_random(ae, device, dtype, seed + 2)
    side = cfg["bagel"]["vit_max_num_patch_per_side"]
    gen = torch.Generator(device=device).manual_seed(seed + 3)
    pos = torch.empty(side * side, llm_hidden, device=device, dtype=dtype).normal_(0, 0.02, generator=gen)
    return VisionModules(vit, connector, pos, ae)
