"""Qwen2.5-shaped Mixture-of-Transformers decoder (spec 1.2) with a packed KV cache.

Every layer holds an "und" weight set (plain names) and a "gen" twin (``*_moe_gen``). Routing is by token
position: in ``und`` mode every token uses the plain weights; in ``gen`` mode a block is
``[<|vision_start|>, N latents, <|vision_end|>]`` and only the N latents use the gen weights. All tokens
attend together in one softmax over [cached context, new block].

Module and parameter names equal the checkpoint's ``language_model.*`` keys. Built with ``with_gen=False``
(understanding only) the ``*_moe_gen`` modules do not exist at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .config import LLMConfig


class RMSNorm(nn.Module):
    """``w * (x * rsqrt(mean(x^2) + eps))`` computed in fp32, cast back before the weight (Qwen2)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, L] -> cos, sin [B, L, 1, head_dim] (rotate-half convention, tables in fp32)."""
    j = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (j / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Expert:
    """One weight set of a layer, gathered so both experts run through the same code."""

    norm1: RMSNorm
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    q_norm: RMSNorm
    k_norm: RMSNorm
    o: nn.Linear
    norm2: RMSNorm
    mlp: MLP


def _round_up(n: int, to: int = 64) -> int:
    """Cache capacities are multiples of 64: aligned masks for the fused attention kernels."""
    return -(-n // to) * to


class KVCache:
    """Per-layer keys (after RoPE) and values, preallocated as [layers, capacity, kv_heads, head_dim]."""

    def __init__(
        self, n_layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device, capacity: int
    ) -> None:
        shape = (n_layers, _round_up(max(capacity, 1)), kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, used: int, needed: int) -> None:
        """Make room for ``needed`` tokens in total, keeping the first ``used`` (grows geometrically)."""
        if needed <= self.capacity:
            return
        cap = _round_up(max(needed, 2 * self.capacity))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], cap, *old.shape[2:]))
            new[:, :used] = old[:, :used]
            setattr(self, name, new)

    def clone(self, used: int, headroom: int = 64) -> KVCache:
        c = KVCache.__new__(KVCache)
        c.k = self.k.new_empty((self.k.shape[0], _round_up(used + headroom), *self.k.shape[2:]))
        c.v = self.v.new_empty(c.k.shape)
        c.k[:, :used] = self.k[:, :used]
        c.v[:, :used] = self.v[:, :used]
        return c


@dataclass
class BlockPlan:
    """How one forward pass attends and whether it writes the cache.

    Cached block (B = 1): ``cache`` + ``past`` (tokens already cached); K/V are written at [past, past+L).
    Uncached query (B branches): ``ctx_k``/``ctx_v`` per layer [B, Kc, kvh, hd] (padded contexts), the new
    K/V are appended after them and ``mask`` hides the padding.
    """

    mode: str  # "und" or "gen"
    causal: bool = False
    backend: str = "sdpa"
    cache: KVCache | None = None
    past: int = 0
    write_index: torch.Tensor | None = None  # static-shape decode: [1] device index of the new token
    mask: torch.Tensor | None = None
    ctx_k: list[torch.Tensor] = field(default_factory=list)
    ctx_v: list[torch.Tensor] = field(default_factory=list)


def split_gen(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, ...] gen-mode block -> (the two markers [B, 2, ...], the latents [B, L-2, ...])."""
    return torch.cat([x[:, :1], x[:, -1:]], dim=1), x[:, 1:-1]


def merge_gen(und: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    return torch.cat([und[:, :1], gen, und[:, 1:]], dim=1)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, with_gen: bool) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(h, nq * d)
        self.k_proj = nn.Linear(h, nkv * d)
        self.v_proj = nn.Linear(h, nkv * d)
        self.o_proj = nn.Linear(nq * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        if with_gen:
            self.q_proj_moe_gen = nn.Linear(h, nq * d)
            self.k_proj_moe_gen = nn.Linear(h, nkv * d)
            self.v_proj_moe_gen = nn.Linear(h, nkv * d)
            self.o_proj_moe_gen = nn.Linear(nq * d, h, bias=False)
            self.q_norm_moe_gen = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm_moe_gen = RMSNorm(d, cfg.rms_norm_eps)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, with_gen: bool) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.self_attn = Attention(cfg, with_gen)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.with_gen = with_gen
        if with_gen:
            self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)

    def expert(self, gen: bool) -> Expert:
        a = self.self_attn
        if not gen:
            return Expert(
                self.input_layernorm, a.q_proj, a.k_proj, a.v_proj, a.q_norm, a.k_norm, a.o_proj,
                self.post_attention_layernorm, self.mlp,
            )  # fmt: skip
        if not self.with_gen:
            raise RuntimeError("this engine was loaded with parts='understanding': the generation expert is absent")
        return Expert(
            self.input_layernorm_moe_gen, a.q_proj_moe_gen, a.k_proj_moe_gen, a.v_proj_moe_gen,
            a.q_norm_moe_gen, a.k_norm_moe_gen, a.o_proj_moe_gen, self.post_attention_layernorm_moe_gen,
            self.mlp_moe_gen,
        )  # fmt: skip

    def _qkv(self, x: torch.Tensor, e: Expert) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        h = e.norm1(x)
        q = e.q_norm(e.q(h).view(b, n, self.n_heads, self.head_dim))
        k = e.k_norm(e.k(h).view(b, n, self.n_kv, self.head_dim))
        v = e.v(h).view(b, n, self.n_kv, self.head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: BlockPlan, idx: int) -> torch.Tensor:
        gen = plan.mode == "gen"
        und_e = self.expert(False)
        if gen:
            gen_e = self.expert(True)
            xu, xg = split_gen(x)
            qu, ku, vu = self._qkv(xu, und_e)
            qg, kg, vg = self._qkv(xg, gen_e)
            q, k, v = merge_gen(qu, qg), merge_gen(ku, kg), merge_gen(vu, vg)
        else:
            q, k, v = self._qkv(x, und_e)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        if plan.write_index is not None:
            # CUDA-graph decode: write at a device-side index, attend to the whole buffer under ``plan.mask``
            ck, cv = plan.cache.k[idx], plan.cache.v[idx]
            ck.index_copy_(0, plan.write_index, k[0])
            cv.index_copy_(0, plan.write_index, v[0])
            keys, values = ck.unsqueeze(0), cv.unsqueeze(0)
        elif plan.cache is not None:
            end = plan.past + x.shape[1]
            plan.cache.k[idx, plan.past : end] = k[0]
            plan.cache.v[idx, plan.past : end] = v[0]
            keys, values = plan.cache.k[idx, :end].unsqueeze(0), plan.cache.v[idx, :end].unsqueeze(0)
        elif plan.ctx_k:
            keys = torch.cat([plan.ctx_k[idx], k], dim=1)
            values = torch.cat([plan.ctx_v[idx], v], dim=1)
        else:
            keys, values = k, v
        attn = attend(q, keys, values, causal=plan.causal, mask=plan.mask, backend=plan.backend)
        attn = attn.reshape(x.shape[0], x.shape[1], -1)

        if gen:
            au, ag = split_gen(attn)
            hu, hg = xu + und_e.o(au), xg + gen_e.o(ag)
            hu = hu + und_e.mlp(und_e.norm2(hu))
            hg = hg + gen_e.mlp(gen_e.norm2(hg))
            return merge_gen(hu, hg)
        h = x + und_e.o(attn)
        return h + und_e.mlp(und_e.norm2(h))


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig, with_gen: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, with_gen) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if with_gen:
            self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2MoTForCausalLM(nn.Module):
    """``model`` (embeddings, layers, norms) + untied ``lm_head``; names as in the checkpoint."""

    def __init__(self, cfg: LLMConfig, with_gen: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.with_gen = with_gen
        self.model = Qwen2MoTModel(cfg, with_gen)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, capacity: int, *, dtype: torch.dtype, device: torch.device) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype=dtype, device=device,
                       capacity=capacity)  # fmt: skip

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        """embeds [B, L, hidden], positions [B, L] -> final-normed hidden states [B, L, hidden]."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, plan, i)
        if plan.mode == "gen":
            xu, xg = split_gen(x)
            return merge_gen(self.model.norm(xu), self.model.norm_moe_gen(xg))
        return self.model.norm(x)
