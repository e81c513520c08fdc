"""Bad input gets a ValueError with a clear message; the engine stays usable afterwards."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import NoTokenizerError


def test_oversized_image_is_refused(tiny):
    big = np.zeros((5000, 4001), np.uint8)  # 20.005 MP
    with pytest.raises(ValueError, match="20 megapixel"):
        tiny.answer([big], "q", max_new_tokens=1)


def test_image_without_pixels_is_refused(tiny):
    # small images are upscaled like the reference (test_reference_edges); an empty one has nothing to scale
    with pytest.raises(ValueError, match="has no pixels"):
        tiny.answer([np.zeros((0, 40), np.uint8)], "q", max_new_tokens=1)
    with pytest.raises(ValueError, match="has no pixels"):
        tiny.edit_image(np.zeros((40, 0, 3), np.uint8), "edit", steps=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(tiny, bad):
    img = np.full((32, 32), 0.5, np.float32)
    img[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        tiny.answer([img], "q", max_new_tokens=1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        tiny.edit_image(torch.from_numpy(img), "edit", steps=2)


def test_out_of_range_and_malformed_images(tiny):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny.answer([np.full((32, 32), 2.0, np.float32)], "q", max_new_tokens=1)
    with pytest.raises(ValueError, match="int32 images must be in 0..255; pass uint16"):
        tiny.answer([np.full((32, 32), 4000, np.int32)], "q", max_new_tokens=1)
    with pytest.raises(ValueError, match="must be 16-bit"):
        tiny.answer([Image.fromarray(np.full((32, 32), 70000, np.int32))], "q", max_new_tokens=1)
    with pytest.raises(ValueError, match="dtype bool"):
        tiny.answer([np.zeros((32, 32), bool)], "q", max_new_tokens=1)
    with pytest.raises(ValueError, match="HxW"):
        tiny.answer([np.zeros((4, 32, 32, 3), np.uint8)], "q", max_new_tokens=1)
    with pytest.raises(ValueError, match="unsupported image type"):
        tiny.answer(["not an image"], "q", max_new_tokens=1)


@pytest.mark.parametrize("text", ["", "   \n", None])
def test_empty_text_is_refused(tiny, gray_image, text):
    with pytest.raises(ValueError, match="non-empty"):
        tiny.answer([gray_image], text, max_new_tokens=1)
    with pytest.raises(ValueError, match="non-empty"):
        tiny.generate_image(text, size=(32, 32), steps=2)
    with pytest.raises(ValueError, match="non-empty"):
        tiny.edit_image(gray_image, text, steps=2)


def test_bad_decoding_parameters(tiny, gray_image):
    with pytest.raises(ValueError, match="temperature"):
        tiny.answer([gray_image], "q", temperature=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        tiny.answer([gray_image], "q", temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny.answer([gray_image], "q", max_new_tokens=0)


def test_generation_size_is_floored_or_capped_with_a_note(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="inference.engine.api"):
        img = tiny.generate_image("x", size=(44, 50), steps=2)
    assert img.shape == (32, 48, 3)  # floored to multiples of 16, as the reference's H // 16
    assert "adjusted to 32x48" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference.engine.api"):
        assert tiny._generation_size((2048, 1024)) == (512, 256)  # the tiny latent table holds 512 px
    assert "at most 512 px" in caplog.text
    with pytest.raises(ValueError, match="minimum"):
        tiny.generate_image("x", size=(8, 64), steps=2)
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        tiny.generate_image("x", size=64, steps=2)


def test_bad_sampler_settings(tiny):
    with pytest.raises(ValueError, match="steps"):
        tiny.generate_image("x", size=(32, 32), steps=1)
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        tiny.generate_image("x", size=(32, 32), steps=2, cfg_renorm_type="bogus")
    with pytest.raises(ValueError, match="cfg_interval"):
        tiny.generate_image("x", size=(32, 32), steps=2, cfg_interval=(0.9, 0.1))
    with pytest.raises(ValueError, match="cfg_text_scale"):
        tiny.generate_image("x", size=(32, 32), steps=2, cfg_text_scale=float("inf"))


def test_engine_still_works_after_errors(tiny, gray_image):
    with pytest.raises(ValueError):
        tiny.answer([gray_image], "")
    assert len(tiny.answer([gray_image], "ok", max_new_tokens=2).token_ids) >= 1


def test_text_api_without_tokenizer_is_clear(tiny_checkpoint, tmp_path):
    import shutil

    from inference.engine import load_engine

    folder = tmp_path / "no_tok"
    shutil.copytree(tiny_checkpoint, folder)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / f).unlink()
    eng = load_engine(str(folder), parts="understanding")
    with pytest.raises(NoTokenizerError, match="no tokenizer files"):
        eng.answer([np.zeros((32, 32), np.uint8)], "q")
    # id-level APIs still work (the parity runner feeds ids)
    with torch.inference_mode():
        ctx = eng.new_context()
        eng.model.append_text(ctx, [1, 2, 3])
        assert len(eng.decode_text(ctx, max_new_tokens=2).token_ids) >= 1
