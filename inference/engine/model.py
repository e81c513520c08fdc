"""The UniMedVL (Bagel) model: LLM + ViT + connector + generation heads, and the context machinery.

A *context* is (KV cache, kv_len, rope). Blocks are appended to it exactly as the reference inferencer
does (spec 3.0, golden README section 3):

| block            | tokens                           | RoPE      | attention | expert                 | r after |
|------------------|----------------------------------|-----------|-----------|------------------------|---------|
| text             | <|im_start|> ids <|im_end|>      | r..r+L-1  | causal    | und                    | r+L     |
| ViT image        | <|vision_start|> N vit <|vision_end|> | all r | full      | und                    | r+1     |
| clean VAE image  | start, N latents (t=0), end      | all r     | full      | markers und, latents gen | r+1   |
| noisy query      | start, N latents (t=sigma), end  | all r     | full      | as above, not cached   | r       |
| decode step      | 1 token                          | r         | all cache | und                    | r+1     |

State-dict keys equal ``ema.safetensors`` (``language_model.*``, ``vit_model.*``, ``connector.*``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import causal_mask
from .config import BagelConfig, LLMConfig, SpecialTokens
from .heads import MLPConnector, PositionEmbedding, TimestepEmbedder
from .llm import BlockPlan, KVCache, Qwen2MoTForCausalLM
from .vit import SiglipNaViT, SiglipVisionConfig

# vit(patches [N, 588], position_ids [N] long, cu_seqlens [n_img+1] int32) -> LLM tokens [N, llm_hidden]
VitFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BlockInfo:
    """Layout record of one cached block (for inspection and the parity runner)."""

    kind: str  # "text", "vit", "vae" or "decode"
    kv_start: int
    n_tokens: int
    rope_start: int
    token_ids: list[int] | None  # text/decode ids; image blocks: [start marker, end marker]


@dataclass
class Context:
    """A KV cache with the number of cached tokens and the next RoPE position."""

    cache: KVCache
    kv_len: int = 0
    rope: int = 0
    blocks: list[BlockInfo] = field(default_factory=list)

    def fork(self) -> Context:
        """An independent copy (CFG branches share a prefix, then diverge)."""
        return Context(self.cache.clone(self.kv_len), self.kv_len, self.rope, list(self.blocks))

    def state(self) -> dict[str, int]:
        return {"kv_len": self.kv_len, "rope": self.rope}


@dataclass
class QueryBatch:
    """Several contexts padded to one length, so the CFG branches of a denoising step run as one batch."""

    ctx_k: list[torch.Tensor]  # per layer [B, Kc, kv_heads, head_dim]
    ctx_v: list[torch.Tensor]
    mask: torch.Tensor | None  # [B, 1, 1, Kc + L] bool, None when no branch is padded
    positions: torch.Tensor  # [B, L] long, every token of a branch at that context's rope
    size: int


def latent_to_tokens(z: torch.Tensor, p: int) -> torch.Tensor:
    """[C, p*h, p*w] latent -> [h*w, p*p*C] tokens; values inside a token in (py, px, c) order, raster order."""
    c, hh, ww = z.shape
    h, w = hh // p, ww // p
    return z.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * c)


def tokens_to_latent(x: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """Inverse of :func:`latent_to_tokens`: [h*w, p*p*C] -> [1, C, p*h, p*w]."""
    return x.reshape(1, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(1, c, h * p, w * p)


def grid_position_ids(h: int, w: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    rows = torch.arange(h, device=device).unsqueeze(1)
    cols = torch.arange(w, device=device).unsqueeze(0)
    return (rows * stride + cols).reshape(-1)


class UniMedVL(nn.Module):
    def __init__(
        self,
        llm_cfg: LLMConfig,
        vit_cfg: SiglipVisionConfig,
        bagel_cfg: BagelConfig,
        tokens: SpecialTokens,
        *,
        latent_channels: int = 16,
        with_gen: bool = True,
    ) -> None:
        super().__init__()
        hidden = llm_cfg.hidden_size
        self.llm_config, self.vit_config, self.bagel_config = llm_cfg, vit_cfg, bagel_cfg
        self.tokens = tokens
        self.with_gen = with_gen
        self.latent_channels = latent_channels
        self.latent_patch = bagel_cfg.latent_patch_size
        self.language_model = Qwen2MoTForCausalLM(llm_cfg, with_gen)
        self.vit_model = SiglipNaViT(vit_cfg)
        self.connector = MLPConnector(vit_cfg.hidden_size, hidden, hidden)
        self.vit_pos_embed = PositionEmbedding(bagel_cfg.vit_max_num_patch_per_side, hidden)
        if with_gen:
            patch_dim = self.latent_patch**2 * latent_channels
            self.time_embedder = TimestepEmbedder(hidden)
            self.vae2llm = nn.Linear(patch_dim, hidden)
            self.llm2vae = nn.Linear(hidden, patch_dim)
            self.latent_pos_embed = PositionEmbedding(bagel_cfg.max_latent_size, hidden)
        self.attention_backend = "sdpa"

    # ---- basics -------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    def new_context(self, capacity: int = 256) -> Context:
        return Context(self.language_model.new_cache(capacity, dtype=self.dtype, device=self.device))

    def embed_ids(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.language_model.model.embed_tokens(t)

    def vit_tokens(self, patches: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The default ViT path: ``connector(SigLIP(patches)) + vit_pos_embed[pos]``."""
        feats = self.vit_model(patches.to(self.device, self.dtype), position_ids.to(self.device), cu_seqlens)
        return self.connector(feats) + self.vit_pos_embed(position_ids.to(self.device))

    def latent_position_ids(self, h: int, w: int) -> torch.Tensor:
        return grid_position_ids(h, w, self.bagel_config.max_latent_size, self.device)

    def latent_embed(self, x: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``vae2llm(x) + time_embedder(t) + latent_pos_embed[pos]``; x [N, 64], t a 1-element tensor."""
        self._need_gen()
        t_emb = self.time_embedder(t.reshape(1).to(self.device))
        return self.vae2llm(x.to(self.device, self.dtype)) + t_emb + self.latent_pos_embed(position_ids)

    def _need_gen(self) -> None:
        if not self.with_gen:
            raise RuntimeError("this engine was loaded with parts='understanding'; image generation is not available")

    # ---- cached blocks ------------------------------------------------------------------------------
    def _append(self, ctx: Context, embeds: torch.Tensor, positions: torch.Tensor, mode: str, causal: bool):
        n = embeds.shape[0]
        ctx.cache.reserve(ctx.kv_len, ctx.kv_len + n)
        flash = self.attention_backend == "flash" and self.dtype in (torch.float16, torch.bfloat16)
        # flash-attn aligns its causal mask bottom-right itself; SDPA gets the explicit mask
        mask = causal_mask(n, ctx.kv_len, self.device) if causal and n > 1 and not flash else None
        plan = BlockPlan(mode=mode, causal=causal, backend=self.attention_backend, cache=ctx.cache,
                         past=ctx.kv_len, mask=mask)  # fmt: skip
        hidden = self.language_model(embeds.unsqueeze(0), positions.unsqueeze(0), plan)[0]
        ctx.kv_len += n
        return hidden

    def append_text(self, ctx: Context, ids: list[int]) -> torch.Tensor:
        """``<|im_start|> ids <|im_end|>`` as a causal und block; returns its final-normed hidden states."""
        seq = [self.tokens.bos_token_id, *ids, self.tokens.eos_token_id]
        pos = torch.arange(ctx.rope, ctx.rope + len(seq), device=self.device)
        ctx.blocks.append(BlockInfo("text", ctx.kv_len, len(seq), ctx.rope, seq))
        hidden = self._append(ctx, self.embed_ids(seq), pos, "und", causal=True)
        ctx.rope += len(seq)
        return hidden

    def _image_block(self, ctx: Context, tokens: torch.Tensor, mode: str) -> torch.Tensor:
        marks = self.embed_ids([self.tokens.start_of_image, self.tokens.end_of_image])
        embeds = torch.cat([marks[:1], tokens.to(self.dtype), marks[1:]])
        kind = "vae" if mode == "gen" else "vit"
        ctx.blocks.append(BlockInfo(kind, ctx.kv_len, embeds.shape[0], ctx.rope,
                                    [self.tokens.start_of_image, self.tokens.end_of_image]))  # fmt: skip
        pos = torch.full((embeds.shape[0],), ctx.rope, device=self.device, dtype=torch.long)
        hidden = self._append(ctx, embeds, pos, mode, causal=False)
        ctx.rope += 1
        return hidden

    def append_vit_tokens(self, ctx: Context, tokens: torch.Tensor) -> torch.Tensor:
        """One image's ViT tokens (already connector + pos) as a full-attention und block."""
        return self._image_block(ctx, tokens, "und")

    def append_vae_latent(self, ctx: Context, latent: torch.Tensor) -> torch.Tensor:
        """A clean VAE latent [C, 2h, 2w] (scaled) as a gen block with t = 0."""
        p = self.latent_patch
        h, w = latent.shape[-2] // p, latent.shape[-1] // p
        x = latent_to_tokens(latent.float(), p)
        t0 = torch.zeros(1, device=self.device)
        return self._image_block(ctx, self.latent_embed(x, t0, self.latent_position_ids(h, w)), "gen")

    def decode_step(self, ctx: Context, token: torch.Tensor) -> torch.Tensor:
        """Feed one token (a [1] long tensor, may live on the device) at rope r; returns logits [vocab]."""
        embeds = self.language_model.model.embed_tokens(token.reshape(1).to(self.device))
        pos = torch.full((1,), ctx.rope, device=self.device, dtype=torch.long)
        hidden = self._append(ctx, embeds, pos, "und", causal=True)
        ctx.rope += 1
        return self.language_model.lm_head(hidden[-1]).float()

    def decode_step_static(
        self, cache: KVCache, token: torch.Tensor, rope: torch.Tensor, kv_index: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Graph-capturable decode step: every shape is fixed by the cache capacity.

        token, rope, kv_index: [1] long device tensors; valid: [capacity] bool (keys the token may see,
        i.e. ``arange(capacity) <= kv_index``). Returns logits [vocab] fp32.
        """
        embeds = self.language_model.model.embed_tokens(token).unsqueeze(0)
        plan = BlockPlan(mode="und", backend="sdpa", cache=cache, write_index=kv_index, mask=valid.view(1, 1, 1, -1))
        hidden = self.language_model(embeds, rope.view(1, 1), plan)[0]
        return self.language_model.lm_head(hidden[-1]).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden).float()

    # ---- uncached denoising queries -----------------------------------------------------------------
    def query_batch(self, contexts: list[Context], n_tokens: int) -> QueryBatch:
        """Pad the contexts' caches to one length (once per image, not per step)."""
        lens = [c.kv_len for c in contexts]
        kc = max(lens)
        b = len(contexts)
        cache0 = contexts[0].cache
        n_layers = cache0.k.shape[0]
        k_all = cache0.k.new_zeros((n_layers, b, kc, *cache0.k.shape[2:]))
        v_all = torch.zeros_like(k_all)
        for i, c in enumerate(contexts):
            k_all[:, i, : c.kv_len] = c.cache.k[:, : c.kv_len]
            v_all[:, i, : c.kv_len] = c.cache.v[:, : c.kv_len]
        mask = None
        if any(n != kc for n in lens):
            cols = torch.arange(kc + n_tokens, device=self.device)
            valid = torch.tensor(lens, device=self.device).unsqueeze(1)
            mask = ((cols.unsqueeze(0) < valid) | (cols.unsqueeze(0) >= kc))[:, None, None, :]
        ropes = torch.tensor([c.rope for c in contexts], device=self.device, dtype=torch.long)
        positions = ropes.unsqueeze(1).expand(b, n_tokens)
        return QueryBatch(list(k_all.unbind(0)), list(v_all.unbind(0)), mask, positions, b)

    def velocity(self, qb: QueryBatch, x: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Velocity of the noisy latent x [N, 64] at time t against each context of ``qb``: [B, N, 64] fp32."""
        lat = self.latent_embed(x, t, position_ids)
        marks = self.embed_ids([self.tokens.start_of_image, self.tokens.end_of_image])
        block = torch.cat([marks[:1], lat, marks[1:]]).unsqueeze(0).expand(qb.size, -1, -1)
        plan = BlockPlan(mode="gen", causal=False, backend=self.attention_backend, mask=qb.mask,
                         ctx_k=qb.ctx_k, ctx_v=qb.ctx_v)  # fmt: skip
        hidden = self.language_model(block, qb.positions, plan)
        return self.llm2vae(hidden[:, 1:-1]).float()
