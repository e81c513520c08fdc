"""Loading checkpoint folders: round trip, understanding-only loading, and errors naming file and tensor."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.engine import CheckpointError, load_engine


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_ema(folder, fn):
    path = folder / "ema.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_round_trip_gives_the_same_engine(tiny, tiny_checkpoint, gray_image):
    eng = load_engine(str(tiny_checkpoint))
    assert eng.tokenizer is not None and eng.tokenizer.kind == "qwen2"
    assert eng.model.tokens == tiny.model.tokens
    for (n, p), (_, q) in zip(eng.model.named_parameters(), tiny.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    a = eng.answer([gray_image], "What is shown?", max_new_tokens=5)
    b = tiny.answer([gray_image], "What is shown?", max_new_tokens=5)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert np.array_equal(
        eng.generate_image("x", size=(32, 48), steps=3), tiny.generate_image("x", size=(32, 48), steps=3)
    )
    info = eng.info
    assert info["is_demo"] is False
    h = hashlib.sha256()
    for f in ("ema.safetensors", "ae.safetensors"):
        h.update((tiny_checkpoint / f).read_bytes())
    assert info["checkpoint_sha256"] == h.hexdigest()


def test_understanding_only_skips_generation_tensors(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "ae.safetensors").unlink()  # not needed for understanding
    eng = load_engine(str(folder), parts="understanding")
    assert eng.vae is None
    assert not any("_moe_gen" in n for n, _ in eng.model.named_parameters())
    with pytest.raises(CheckpointError, match="ae.safetensors"):
        load_engine(str(folder), parts="all")


@pytest.mark.parametrize("missing", ["llm_config.json", "vit_config.json", "ema.safetensors"])
def test_missing_file_is_named(tiny_checkpoint, tmp_path, missing):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_engine(str(folder))


def test_wrong_shape_names_file_and_tensor(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    key = "language_model.model.layers.1.self_attn.k_proj.weight"
    _edit_ema(folder, lambda t: t.__setitem__(key, torch.zeros(8, 64)))
    with pytest.raises(CheckpointError, match=rf"ema\.safetensors: tensor '{key}' has shape \[8, 64\]"):
        load_engine(str(folder))


def test_unexpected_key_names_file_and_tensor(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_ema(folder, lambda t: t.__setitem__("vit_model.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: unexpected tensor 'vit_model\.extra\.weight'"):
        load_engine(str(folder))


def test_missing_key_names_file_and_tensor(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_ema(folder, lambda t: t.pop("llm2vae.bias"))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: tensor 'llm2vae\.bias' is missing"):
        load_engine(str(folder))
    # the understanding-only engine does not need it
    assert load_engine(str(folder), parts="understanding").model.with_gen is False


def test_ae_module_prefix_is_stripped(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    path = folder / "ae.safetensors"
    save_file({f"module.{k}": v for k, v in load_file(str(path)).items()}, str(path))
    assert load_engine(str(folder)).vae is not None


def test_hub_id_gets_download_instructions():
    with pytest.raises(CheckpointError, match=r"huggingface-cli download General-Medical-AI/UniMedVL --local-dir"):
        load_engine("General-Medical-AI/UniMedVL")


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_engine(str(tmp_path / "nope" / "deeper" / "x"))


def test_bad_options(tiny_checkpoint):
    with pytest.raises(ValueError, match="parts"):
        load_engine(str(tiny_checkpoint), parts="half")
    with pytest.raises(ValueError, match="attention"):
        load_engine("tiny", attention="xformers")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash"):
            load_engine("tiny", attention="flash")
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_engine("tiny", device="cuda")


def test_bf16_ema_file_alone_is_accepted(tiny, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "ema.safetensors").rename(folder / "ema_bf16.safetensors")
    eng = load_engine(str(folder), parts="understanding")
    assert torch.equal(eng.model.language_model.lm_head.weight, tiny.model.language_model.lm_head.weight)
