"""The small modules around the LLM: connector, fixed 2-D sin-cos position tables, timestep embedder.

Names equal the checkpoint keys (``connector.fc1``, ``vit_pos_embed.pos_embed``, ``time_embedder.mlp.0`` ...).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d_table(grid: int, dim: int) -> np.ndarray:
    """[grid*grid, dim] float32 table, row index = row*grid + col (spec 1.5).

    The first dim/2 channels encode the column, the last dim/2 the row; each half is
    [sin(p*w_k)] ++ [cos(p*w_k)] with w_k = 10000^(-k/(dim/4)). Computed in float64 like the reference.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width {dim} must be a multiple of 4")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def half(p: np.ndarray) -> np.ndarray:
        out = np.outer(p, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([half(cols.reshape(-1)), half(rows.reshape(-1))], axis=1).astype(np.float32)


class PositionEmbedding(nn.Module):
    """A fixed table held as a parameter so that it is loaded from (and saved to) the checkpoint."""

    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)

    def reset_sincos(self) -> None:
        with torch.no_grad():
            table = torch.from_numpy(sincos_2d_table(self.grid, self.pos_embed.shape[1]))
            self.pos_embed.copy_(table.to(self.pos_embed.dtype))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class MLPConnector(nn.Module):
    """ViT features -> LLM width: fc1, tanh-GELU, fc2 (both with bias)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


TIMESTEP_FREQ_DIM = 256


def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM) -> torch.Tensor:
    """t [B] (flow time in [0,1], not x1000) -> [B, dim] = [cos(t f_k)] ++ [sin(t f_k)], cosine first."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = TIMESTEP_FREQ_DIM) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))
