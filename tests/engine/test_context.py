"""Context machinery: cache growth, forks, and batched CFG branches equal separate passes."""

from __future__ import annotations

import torch

from inference.engine.attention import causal_mask


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(3, 2, torch.device("cpu"))
    assert m.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]


@torch.inference_mode()
def test_cache_growth_and_fork_do_not_change_results(tiny):
    m = tiny.model
    small = m.new_context(capacity=1)  # grows several times
    big = m.new_context(capacity=512)
    for ctx in (small, big):
        m.append_text(ctx, [5, 6, 7, 8])
        m.append_text(ctx, list(range(20, 40)))
    assert small.state() == big.state() == {"kv_len": 28, "rope": 28}
    assert torch.equal(small.cache.k[:, :28], big.cache.k[:, :28])
    fork = big.fork()
    h_fork = m.append_text(fork, [9, 9])
    assert big.state() == {"kv_len": 28, "rope": 28}  # the original is untouched
    h_big = m.append_text(big, [9, 9])
    assert torch.allclose(h_fork, h_big, atol=1e-6)


@torch.inference_mode()
def test_batched_branches_equal_single_passes(tiny):
    m = tiny.model
    a, b, empty = m.new_context(), m.new_context(), m.new_context()
    m.append_text(a, [1, 2, 3, 4, 5, 6])
    m.append_text(b, [7, 8])
    h, w = 2, 3
    x = torch.randn(h * w, 64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7])
    pos = m.latent_position_ids(h, w)
    batched = m.velocity(m.query_batch([a, b, empty], h * w + 2), x, t, pos)
    for i, ctx in enumerate((a, b, empty)):
        single = m.velocity(m.query_batch([ctx], h * w + 2), x, t, pos)[0]
        assert torch.allclose(batched[i], single, atol=1e-5), i
