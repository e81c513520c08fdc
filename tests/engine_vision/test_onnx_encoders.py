"""ONNX exports of ViT+connector and VAE encoder/decoder: parity with PyTorch, dynamic sizes, cache, fallback."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from inference.engine.vit import patchify
from inference.onnx import build_encoders, select_providers
from tests.engine_vision.conftest import GoldenSet, build_connector, build_vae, build_vit, golden_sets

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def tiny():
    root = golden_sets()[0]
    gs = GoldenSet(root, json.loads((root / "manifest.json").read_text()))
    vit = build_vit(gs)
    connector, pos = build_connector(gs)
    return vit, connector, pos, build_vae(gs)


@pytest.fixture(scope="module")
def onnx_cpu(tiny, tmp_path_factory):
    vit, connector, pos, ae = tiny
    cache = tmp_path_factory.mktemp("onnx_cache")
    enc = build_encoders(backend="onnx", cache_dir=cache, vit=vit, connector=connector, vit_pos_table=pos, ae=ae)
    return enc, cache


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[(28, 42)], [(70, 56), (14, 28), (42, 42)]], ids=["one", "packed3"])
def test_vit_connector_matches_torch(tiny, onnx_cpu, sizes) -> None:
    vit, connector, pos, _ = tiny
    enc, _ = onnx_cpu
    gen = torch.Generator().manual_seed(sum(h * w for h, w in sizes))
    patches, ids, lens = [], [], [0]
    for h, w in sizes:
        p, i = patchify(torch.rand(3, h, w, generator=gen) * 2 - 1)
        patches.append(p)
        ids.append(i)
        lens.append(lens[-1] + len(i))
    p, i, cu = torch.cat(patches), torch.cat(ids), torch.tensor(lens, dtype=torch.int32)
    want = connector(vit(p, i, cu)) + pos[i]
    got = enc.vit(p, i, cu)
    assert got.shape == want.shape
    assert torch.allclose(got, want, **TOL), (got - want).abs().max()


@torch.no_grad()
@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_vae_matches_torch(tiny, onnx_cpu, hw) -> None:
    ae = tiny[3]
    enc, _ = onnx_cpu
    h, w = hw
    gen = torch.Generator().manual_seed(h * w)
    x = torch.rand(1, 3, h, w, generator=gen) * 2 - 1
    eps = torch.randn(1, 16, h // 8, w // 8, generator=gen)
    assert torch.allclose(enc.vae_encode(x, noise=eps), ae.encode(x, noise=eps), **TOL)
    assert torch.allclose(enc.vae_encode(x, sample=False), ae.encode(x, sample=False), **TOL)
    z = torch.randn(1, 16, h // 8, w // 8, generator=gen)
    got = enc.vae_decode(z)
    assert got.shape == (1, 3, h, w)
    assert torch.allclose(got, ae.decode(z), **TOL)


def test_export_is_reused_and_keyed_by_weights(tiny, onnx_cpu) -> None:
    vit, connector, pos, ae = tiny
    first, cache = onnx_cpu
    files = sorted(cache.rglob("*.onnx"))
    assert [f.name for f in files] == ["vae_decoder.onnx", "vae_encoder.onnx", "vit.onnx"]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = build_encoders(backend="onnx", cache_dir=cache, vit=vit, connector=connector, vit_pos_table=pos, ae=ae)
    assert again.exported == []
    assert again.folders == first.folders
    assert {f: f.stat().st_mtime_ns for f in files} == stamps

    # other weights (same shapes) must not reuse the graph
    other = copy.deepcopy(ae)
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.5)
    third = build_encoders(backend="onnx", cache_dir=cache, ae=other)
    assert third.exported == ["vae_encoder", "vae_decoder"]
    assert third.folders["vae"] != first.folders["vae"]


def test_missing_tensorrt_falls_back_with_warning(tiny, tmp_path, caplog) -> None:
    vit, connector, pos, _ = tiny
    with caplog.at_level(logging.WARNING, logger="inference.onnx"):
        chain = select_providers("tensorrt", trt_cache_dir=tmp_path / "trt", available=["CPUExecutionProvider"])
    assert chain == ["CPUExecutionProvider"]
    assert any("TensorrtExecutionProvider is not available" in r.getMessage() for r in caplog.records)

    import onnxruntime

    # What this machine offers, without TensorRT: the fallback path runs on a TensorRT machine too.
    without_trt = [p for p in onnxruntime.get_available_providers() if p != "TensorrtExecutionProvider"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference.onnx"):
        enc = build_encoders(
            backend="tensorrt",
            cache_dir=tmp_path,
            vit=vit,
            connector=connector,
            vit_pos_table=pos,
            available=without_trt,
        )
    assert enc.providers["vit"] in ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert any("falling back" in r.getMessage() for r in caplog.records)
    p, i = patchify(torch.zeros(3, 14, 28))
    with torch.no_grad():
        want = connector(vit(p, i, None)) + pos[i]
    assert torch.allclose(enc.vit(p, i, torch.tensor([0, 2], dtype=torch.int32)), want, **TOL)


def test_provider_order_and_trt_cache_options(tmp_path) -> None:
    chain = select_providers("onnx", available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [c if isinstance(c, str) else c[0] for c in chain] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = select_providers("tensorrt", trt_cache_dir=tmp_path / "engines", available=avail)
    assert [c if isinstance(c, str) else c[0] for c in trt] == avail
    opts = trt[0][1]
    assert opts["trt_engine_cache_enable"] is True
    assert opts["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert (tmp_path / "engines").is_dir()


def test_unknown_backend_rejected() -> None:
    with pytest.raises(ValueError, match="encoders must be one of"):
        select_providers("openvino")


@torch.no_grad()
def test_fp16_graphs_close_to_fp32_torch(tiny, tmp_path) -> None:
    """The GPU default (fp16 graphs) exports and stays within fp16 error; outputs come back in the caller's dtype."""
    vit, connector, pos, ae = tiny
    enc = build_encoders(
        backend="onnx", cache_dir=tmp_path, vit=vit, connector=connector, vit_pos_table=pos, ae=ae, precision="fp16"
    )
    p, i = patchify(torch.rand(3, 42, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1)
    want = connector(vit(p, i, None)) + pos[i]
    got = enc.vit(p, i, torch.tensor([0, len(i)], dtype=torch.int32))
    assert got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()).item() < 5e-3
    z = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(5))
    want_x = ae.decode(z)
    assert ((enc.vae_decode(z) - want_x).norm() / want_x.norm()).item() < 5e-3
    # an fp16 graph is a different cache entry from the fp32 one
    fp32 = build_encoders(backend="onnx", cache_dir=tmp_path, ae=ae, precision="fp32")
    assert fp32.exported == ["vae_encoder", "vae_decoder"] and fp32.folders["vae"] != enc.folders["vae"]
