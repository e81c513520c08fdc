"""CUDA-graph replay of the text decode step (the 7B decode is launch-bound without it).

One graph per decode call: the cache buffer of the context is fixed (capacity reserved up front), the
token, RoPE position and cache index live in static device tensors, and attention covers the whole buffer
under a validity mask, so one ``replay`` runs all layers with no Python per layer and no host sync.
"""

from __future__ import annotations

import torch

from .model import Context, UniMedVL


class GraphDecoder:
    def __init__(self, model: UniMedVL, ctx: Context, warmup: int = 1) -> None:
        dev = model.device
        self.model, self.ctx = model, ctx
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.rope = torch.full((1,), ctx.rope, dtype=torch.long, device=dev)
        self.kv = torch.full((1,), ctx.kv_len, dtype=torch.long, device=dev)
        self.arange = torch.arange(ctx.cache.capacity, device=dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside capture (allocator, kernel selection)
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        # warm-up/capture wrote K/V of a dummy token at ctx.kv_len: the first real step overwrites that slot

    def _step(self) -> torch.Tensor:
        valid = self.arange <= self.kv
        return self.model.decode_step_static(self.ctx.cache, self.token, self.rope, self.kv, valid)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` ([1] long, on the device) at the context's rope/kv position; returns logits [vocab]."""
        self.token.copy_(token.reshape(1))
        self.rope.fill_(self.ctx.rope)
        self.kv.fill_(self.ctx.kv_len)
        self.graph.replay()
        self.ctx.rope += 1
        self.ctx.kv_len += 1
        return self.logits
