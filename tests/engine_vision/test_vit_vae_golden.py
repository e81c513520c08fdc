"""ViT (+ connector + vit_pos_embed) and FLUX VAE against the reference's golden vectors (fp32, CPU)."""

from __future__ import annotations

import re

import torch

from inference.engine.vit import patchify
from tests.engine_vision.conftest import GOLDEN_ROOT, GoldenSet, build_connector, build_vae, build_vit, golden_sets

TOL = {"atol": 1e-4, "rtol": 1e-4}


def outputs(case: dict) -> dict[str, dict]:
    return {k: v for k, v in case["tensors"].items() if v["role"] in ("output", "output_uint8")}


def assert_matches(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.dtype == torch.uint8:
        diff = (got.to(torch.int16) - want.to(torch.int16)).abs().max().item()
        assert diff <= 1, f"{name}: uint8 max difference {diff}"
    elif not want.is_floating_point():
        assert torch.equal(got.long(), want.long()), f"{name}: integer tensors differ"
    else:
        err = (got - want).abs().max().item()
        assert torch.allclose(got, want, **TOL), f"{name}: max abs error {err:.3g}"


def test_golden_sets_present() -> None:
    assert golden_sets(), f"no golden sets under {GOLDEN_ROOT}"


@torch.no_grad()
def test_vae_case(golden: GoldenSet) -> None:
    case, t = golden.case("vae")
    ae = build_vae(golden)
    mean, logvar = ae.encode_moments(t["image"])
    assert_matches("enc_moments", torch.cat([mean, logvar], dim=1), t["enc_moments"])
    got = {
        "z_scaled": ae.encode(t["image"], noise=t["eps"]),
        "z_mean_scaled": ae.encode(t["image"], sample=False),
        "decode_out": ae.decode(t["decode_in"]),
        "roundtrip_out": ae.decode(t["z_scaled"]),
    }
    expected = outputs(case)
    assert set(expected) <= set(got), f"unchecked vae outputs: {set(expected) - set(got)}"
    for name in expected:
        assert_matches(name, got[name], t[name])


@torch.no_grad()
def test_vae_sampling_draws_noise(golden: GoldenSet) -> None:
    """Without injected noise the posterior is sampled (as the reference), and a generator makes it repeatable."""
    _, t = golden.case("vae")
    ae = build_vae(golden)
    a = ae.encode(t["image"], generator=torch.Generator().manual_seed(7))
    b = ae.encode(t["image"], generator=torch.Generator().manual_seed(7))
    c = ae.encode(t["image"], generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@torch.no_grad()
def test_vit_case(golden: GoldenSet) -> None:
    case, t = golden.case("vit")
    vit = build_vit(golden)
    connector, pos_table = build_connector(golden)
    per_side = case["params"]["vit_max_num_patch_per_side"]
    assert per_side == vit.config.max_patches_per_side

    # patchify every image named imageK and compare with the recorded intermediates
    names = sorted((k for k in t if re.fullmatch(r"image\d+", k)), key=lambda k: int(k[5:]))
    assert names, "vit case has no images"
    patches, pos_ids = [], []
    for name in names:
        p, ids = patchify(t[name], case["params"]["patch_size"], per_side)
        assert_matches(f"{name}_patches", p, t[f"{name}_patches"])
        assert_matches(f"{name}_position_ids", ids, t[f"{name}_position_ids"])
        patches.append(p)
        pos_ids.append(ids)
    assert_matches("packed_patches", torch.cat(patches), t["packed_patches"])
    assert_matches("packed_position_ids", torch.cat(pos_ids), t["packed_position_ids"])

    cu = t["cu_seqlens"].to(torch.int32)
    emb = vit.vision_model.embeddings(t["packed_patches"], t["packed_position_ids"])
    assert_matches("vit_embeddings", emb, t["vit_embeddings"])
    vit_out = vit(t["packed_patches"], t["packed_position_ids"], cu)
    conn = connector(vit_out)
    got = {"vit_out": vit_out, "connector_out": conn, "llm_vit_tokens": conn + pos_table[t["packed_position_ids"]]}
    expected = outputs(case)
    assert set(expected) <= set(got), f"unchecked vit outputs: {set(expected) - set(got)}"
    for name in expected:
        assert_matches(name, got[name], t[name])

    # packing must not leak attention across images: each image alone gives the same rows
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        single = vit(patches[i], pos_ids[i], torch.tensor([0, b - a], dtype=torch.int32))
        assert_matches(f"image{i}_alone", single, vit_out[a:b])
