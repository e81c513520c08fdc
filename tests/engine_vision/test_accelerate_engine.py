"""accelerate_engine on the real Engine: ONNX encoders give the same tokens, latents and images as PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.engine import build_tiny
from inference.onnx import accelerate_engine


@pytest.fixture(scope="module")
def engine():
    return build_tiny(device="cpu")


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@torch.no_grad()
def test_onnx_encoders_inside_engine(engine, tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    vit_in = [torch.rand(3, 42, 56, generator=gen) * 2 - 1, torch.rand(3, 28, 14, generator=gen) * 2 - 1]
    vae_in = torch.rand(3, 64, 48, generator=gen) * 2 - 1
    eps = torch.randn(1, 16, 8, 6, generator=gen)

    ref_tokens = engine.vit_tokens(vit_in)
    ref_z = engine.vae_encode(vae_in, eps)
    ref_x = engine.vae_decode(ref_z.unsqueeze(0))
    ref_edit = engine.edit_image(_image(48, 64, 1), "make it brighter", steps=3, seed=5)

    built = accelerate_engine(engine, "onnx", tmp_path)
    try:
        assert built is not None and set(built.providers) == {"vit", "vae_encode", "vae_decode"}
        for got, want in zip(engine.vit_tokens(vit_in), ref_tokens, strict=True):
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        z = engine.vae_encode(vae_in, eps)
        assert torch.allclose(z, ref_z, atol=1e-4, rtol=1e-4)
        assert torch.allclose(engine.vae_decode(z.unsqueeze(0)), ref_x, atol=1e-4, rtol=1e-4)
        edit = engine.edit_image(_image(48, 64, 1), "make it brighter", steps=3, seed=5)
        assert edit.shape == ref_edit.shape
        assert np.abs(edit.astype(np.int16) - ref_edit.astype(np.int16)).max() <= 1
    finally:
        assert accelerate_engine(engine, "torch", tmp_path) is None
    # back on PyTorch: bit-identical to before
    assert all(torch.equal(a, b) for a, b in zip(engine.vit_tokens(vit_in), ref_tokens, strict=True))


def test_understanding_only_engine_exports_vit_only(tmp_path) -> None:
    eng = build_tiny(device="cpu", parts="understanding")
    built = accelerate_engine(eng, "onnx", tmp_path)
    assert set(built.providers) == {"vit"}
    assert [p.name for p in tmp_path.rglob("*.onnx")] == ["vit.onnx"]


def test_unknown_encoders_value_rejected(engine, tmp_path) -> None:
    with pytest.raises(ValueError, match="encoders must be one of"):
        accelerate_engine(engine, "openvino", tmp_path)
