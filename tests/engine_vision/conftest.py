"""Golden-vector helpers for the vision encoders (ViT, connector composition, VAE)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from inference.engine.vae import AutoEncoderParams, FluxAutoEncoder
from inference.engine.vit import SiglipNaViT, SiglipVisionConfig
from tests.conftest import REPO

GOLDEN_ROOT = REPO.parent / "shared" / "golden"


def golden_sets() -> list[Path]:
    """Every golden set folder (one with a manifest.json) under shared/golden."""
    if not GOLDEN_ROOT.is_dir():
        return []
    return sorted(p for p in GOLDEN_ROOT.iterdir() if (p / "manifest.json").is_file())


@dataclass
class GoldenSet:
    root: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.root.name

    def file(self, key: str) -> Path:
        return self.root / self.manifest["checkpoint"]["files"][key]

    def case(self, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        for c in self.manifest["cases"]:
            if c["name"] == name:
                return c, load_file(self.root / c["file"])
        pytest.fail(f"golden set {self.name} has no case {name!r}: every set in this format has vae and vit cases")

    def ema(self) -> dict[str, torch.Tensor]:
        return load_file(self.file("ema"))


class TinyConnector(nn.Module):
    """Test-local stand-in for the engine's MLP connector (fc1, tanh-GELU, fc2), keys ``fc1.*``/``fc2.*``."""

    def __init__(self, vit_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vit_hidden, llm_hidden)
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def sub_state(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def build_vit(gs: GoldenSet) -> SiglipNaViT:
    vit = SiglipNaViT(SiglipVisionConfig.from_json(gs.file("vit_config")))
    vit.load_state_dict(sub_state(gs.ema(), "vit_model."), strict=True)
    return vit.eval()


def build_connector(gs: GoldenSet) -> tuple[TinyConnector, torch.Tensor]:
    sd = gs.ema()
    conn_sd = sub_state(sd, "connector.")
    llm_hidden, vit_hidden = conn_sd["fc1.weight"].shape
    conn = TinyConnector(vit_hidden, llm_hidden)
    conn.load_state_dict(conn_sd, strict=True)
    return conn.eval(), sd["vit_pos_embed.pos_embed"]


def build_vae(gs: GoldenSet) -> FluxAutoEncoder:
    ae = FluxAutoEncoder(AutoEncoderParams.from_json(gs.file("ae_config")))
    ae.load_state_dict(load_file(gs.file("ae")), strict=True)
    return ae.eval()


@pytest.fixture(params=golden_sets(), ids=lambda p: p.name)
def golden(request: pytest.FixtureRequest) -> GoldenSet:
    root: Path = request.param
    return GoldenSet(root, json.loads((root / "manifest.json").read_text()))
