"""Attention kernels for the MoT decoder: PyTorch SDPA with explicit masks, flash-attn on CUDA when present.

Layout everywhere: queries [B, Lq, H, D], keys/values [B, Lk, KVH, D] (token-major, like the KV cache).
Query head h uses KV head h // (H // KVH) (grouped-query attention).

Mask semantics (spec 3.0/4.1): a causal block of L new tokens after ``past`` cached tokens is aligned
bottom-right (new token i sees keys 0 .. past+i); a full block sees every key. A boolean mask is True
where attention is allowed.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional; the reference runs every LLM attention through flash_attn
    from flash_attn import flash_attn_func as _flash_func
except Exception:  # ImportError, or a broken CUDA build of the wheel
    _flash_func = None

BACKENDS = ("auto", "sdpa", "flash")


def flash_available() -> bool:
    return _flash_func is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` -> flash on CUDA when flash_attn imports, else sdpa; ``flash`` without the package is an error."""
    if name not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {name!r}")
    if name == "sdpa":
        return "sdpa"
    usable = _flash_func is not None and device.type == "cuda"
    if name == "flash" and not usable:
        why = "flash_attn is not importable" if _flash_func is None else "flash-attn needs a CUDA device"
        raise ValueError(f"attention='flash' requested but {why}; use attention='sdpa' or 'auto'")
    return "flash" if usable else "sdpa"


def causal_mask(n_new: int, past: int, device: torch.device) -> torch.Tensor:
    """[n_new, past + n_new] bool, bottom-right aligned causal mask."""
    rows = torch.arange(n_new, device=device).unsqueeze(1)
    cols = torch.arange(past + n_new, device=device).unsqueeze(0)
    return cols <= rows + past


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v. ``mask`` (bool, broadcastable to [B, 1, Lq, Lk]) overrides ``causal``.

    ``causal`` with ``mask=None`` is only used by the flash path (bottom-right aligned in flash-attn >= 2.1);
    the SDPA path always gets an explicit mask from the caller.
    """
    if backend == "flash" and q.dtype in (torch.float16, torch.bfloat16) and (mask is None):
        return _flash_func(q, k, v, causal=causal)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    elif mask is not None and mask.dim() == 3:
        mask = mask[:, None]
    b, lq, n_heads, d = q.shape
    n_kv = k.shape[2]
    n_rep = n_heads // n_kv
    if lq == 1 and n_rep > 1:
        # decode step: the n_rep query heads of one KV head become n_rep query rows of that head, so K/V are
        # read once, never repeated (h = kv * n_rep + r, the GQA mapping); any kernel, any mask
        qg = q.reshape(b, n_kv, n_rep, d)
        out = F.scaled_dot_product_attention(qg, kh, vh, attn_mask=mask)
        return out.reshape(b, 1, n_heads, d)
    if n_rep > 1 and mask is None:
        # no copy of K/V; CUDA SDPA's flash kernel handles GQA only without a mask
        out = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)
        return out.transpose(1, 2)
    if n_rep > 1:  # with a mask the memory-efficient kernel runs, which needs matching head counts
        kh = kh.repeat_interleave(n_rep, dim=1)
        vh = vh.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(1, 2)
