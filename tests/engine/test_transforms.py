"""Image preprocessing (spec 3.1/3.3) and other fixed tables, checked by value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine.heads import sincos_2d_table, timestep_features
from inference.engine.sampler import shifted_schedule
from inference.engine.transforms import (
    VAE_EDIT,
    VIT_CHAT,
    VIT_INTERLEAVE,
    preprocess,
    resize,
    to_model_tensor,
    to_pil_rgb,
)
from tests.engine.conftest import golden_sets


@pytest.mark.parametrize(
    ("rule", "size", "expected"),
    [
        (VIT_CHAT, (1024, 1024), (980, 980)),  # spec example: 4900 ViT tokens
        (VIT_CHAT, (512, 512), (518, 518)),  # spec example: 37x37 tokens
        # min side 200 -> scale 1.89: 567 x 378; 567/14 = 40.5 rounds half to even -> 560
        (VIT_CHAT, (300, 200), (560, 378)),
        # 15120x378 is over max_pixels: sides x 0.35117 (the pixel ratio, not its root) -> 5306x140,
        # long side > 980 -> x 980/5306 -> 980 x 26 -> snapped to 28
        (VIT_CHAT, (4000, 100), (980, 28)),
        (VIT_INTERLEAVE, (64, 48), (518, 392)),  # min 387: 516x387 -> 518x392
        (VAE_EDIT, (1024, 1024), (1024, 1024)),
        (VAE_EDIT, (50, 70), (48, 64)),
        (VAE_EDIT, (2000, 1500), (1024, 768)),
        (VAE_EDIT, (20, 3000), (16, 1024)),  # at least one stride per side
    ],
)
def test_resize_rule_by_value(rule, size, expected):
    assert rule.target_size(*size) == expected
    w, h = rule.target_size(*size)
    assert w % rule.stride == 0 and h % rule.stride == 0


def test_pixels_are_normalised_to_minus_one_one():
    arr = np.array([[[0, 255, 128]] * 14] * 14, np.uint8)
    t = to_model_tensor(Image.fromarray(arr))
    assert t.shape == (3, 14, 14) and t.dtype == torch.float32
    assert t[0, 0, 0] == -1.0 and t[1, 0, 0] == 1.0
    assert t[2, 0, 0] == pytest.approx((128 / 255 - 0.5) / 0.5, abs=1e-7)


def test_image_at_target_size_is_not_resampled_and_others_use_bicubic():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (392, 518, 3), dtype=np.uint8)
    out = preprocess(arr, VIT_INTERLEAVE)
    assert torch.equal(out, (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)
    small = Image.fromarray(arr[:48, :64])
    expected = np.asarray(small.resize((518, 392), Image.BICUBIC))
    assert np.array_equal(np.asarray(resize(small, VIT_INTERLEAVE)), expected)


def test_transparency_is_composited_on_white_and_gray_becomes_rgb():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:10, :, :] = (10, 20, 30, 255)  # opaque top, fully transparent bottom
    img = np.asarray(to_pil_rgb(rgba))
    assert tuple(img[0, 0]) == (10, 20, 30)
    assert tuple(img[15, 0]) == (255, 255, 255)
    gray = np.asarray(to_pil_rgb(np.full((16, 16), 77, np.uint8)))
    assert gray.shape == (16, 16, 3) and (gray == 77).all()
    chw = torch.full((3, 16, 16), 9, dtype=torch.uint8)
    assert (np.asarray(to_pil_rgb(chw)) == 9).all()
    f = np.asarray(to_pil_rgb(np.full((16, 16), 0.5, np.float32)))
    assert (f == 128).all()


def test_shifted_schedule_by_value():
    s = shifted_schedule(4, 3.0)
    assert s.dtype == torch.float32
    assert torch.allclose(s, torch.tensor([1.0, 6 / 7, 0.6, 0.0]), atol=1e-7)
    assert torch.equal(shifted_schedule(5, 1.0), torch.linspace(1, 0, 5))


def test_timestep_features_cosine_first_unscaled():
    f = timestep_features(torch.tensor([0.0, 0.5]))
    assert f.shape == (2, 256)
    assert torch.equal(f[0, :128], torch.ones(128)) and torch.equal(f[0, 128:], torch.zeros(128))
    k = 5
    fk = math.exp(-math.log(10000) * k / 128)
    assert f[1, k].item() == pytest.approx(math.cos(0.5 * fk), abs=1e-6)
    assert f[1, 128 + k].item() == pytest.approx(math.sin(0.5 * fk), abs=1e-6)


def test_sincos_tables_match_the_golden_checkpoint():
    sets = golden_sets()
    if not sets:
        pytest.fail("no golden set found under ../shared/golden")
    import json

    from safetensors import safe_open

    root = sets[0]
    bagel = json.loads((root / "checkpoint" / "bagel_config.json").read_text())
    with safe_open(str(root / "checkpoint" / "ema.safetensors"), "pt") as f:
        vit_tab = f.get_tensor("vit_pos_embed.pos_embed")
        lat_tab = f.get_tensor("latent_pos_embed.pos_embed")
    side = bagel["vit_max_num_patch_per_side"]
    assert np.allclose(sincos_2d_table(side, vit_tab.shape[1]), vit_tab.numpy(), atol=1e-6)
    assert np.allclose(sincos_2d_table(bagel["max_latent_size"], lat_tab.shape[1]), lat_tab.numpy(), atol=1e-6)
    # first half encodes the column, second half the row
    t = sincos_2d_table(4, 8)
    assert t[1, 0] == pytest.approx(math.sin(1.0)) and t[1, 4] == pytest.approx(0.0)
    assert t[4, 0] == pytest.approx(0.0) and t[4, 4] == pytest.approx(math.sin(1.0))
