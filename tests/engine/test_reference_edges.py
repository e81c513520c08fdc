"""Edge behaviour taken from the reference source (uni-medical/UniMedVL at 64a9915), case by case.

Each test names the reference file and lines whose behaviour it pins: small images (transforms.py:73-75),
transparency (data_utils.py:124-130), answer cut (bagel.py:1390), defaults (inferencer.py:552-568,
interactive_image_generator.py:302-307/367-369), size flooring (bagel.py:833), one resize (transforms.py:87).
"""

from __future__ import annotations

import inspect
import io
import itertools

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference import preprocess as pp
from inference.engine import Engine
from inference.engine.api import nucleus
from inference.engine.tokenizer import AnswerStream, cut_answer
from inference.engine.transforms import VAE_EDIT, VIT_CHAT, VIT_INTERLEAVE, preprocess, resize, to_pil_rgb


# ---- images under one patch are upscaled (transforms.py:73-75), not refused ------------------------------
@pytest.mark.parametrize(
    ("rule", "size", "expected"),
    [
        (VIT_CHAT, (13, 7), (700, 378)),  # the case: scale 378/7 = 54 -> 702x378 -> 700x378
        (VAE_EDIT, (13, 7), (64, 32)),  # scale 32/7 -> 59x32 -> 64x32
        (VIT_CHAT, (1, 1), (378, 378)),
        (VIT_INTERLEAVE, (1, 1), (392, 392)),  # 387 snapped to the nearest multiple of 14
        (VAE_EDIT, (1, 1), (32, 32)),
    ],
)
def test_small_images_follow_the_resize_rule(rule, size, expected):
    assert rule.target_size(*size) == expected


def test_every_small_size_is_accepted_and_scaled_to_whole_patches():
    for (w, h), rule in itertools.product(itertools.product(range(1, 16), repeat=2), (VIT_CHAT, VAE_EDIT)):
        tw, th = rule.target_size(w, h)
        assert tw % rule.stride == 0 and th % rule.stride == 0 and min(tw, th) >= rule.stride
        assert max(tw, th) <= rule.max_size
    for w, h in ((1, 1), (13, 7), (2, 15)):
        t = preprocess(np.full((h, w), 90, np.uint8), VAE_EDIT)
        assert t.shape == (3, *VAE_EDIT.target_size(w, h)[::-1]) and torch.allclose(t, t.flatten()[0])


def test_engine_flows_take_tiny_images(tiny):
    n_q = len(tiny.tokenizer.encode("q"))
    a = tiny.answer([np.full((7, 13), 50, np.uint8)], "q", max_new_tokens=1)
    assert a.n_prompt_tokens == (50 * 27 + 2) + (n_q + 2)  # 700x378 -> 50x27 ViT patches + markers
    assert tiny.edit_image(np.full((7, 13, 3), 200, np.uint8), "e", steps=2).shape == (32, 64, 3)


# ---- transparency as pil_img2rgb (data_utils.py:124-130) --------------------------------------------------
def _png(img: Image.Image, **kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    buf.seek(0)
    return Image.open(buf)


def _cases() -> list[tuple[str, Image.Image, tuple[int, int, int]]]:
    """(name, image, expected RGB of pixel (0, 0)); pixel (0, 0) is fully transparent where alpha exists."""
    gray = np.full((4, 4), 60, np.uint8)
    alpha0 = np.zeros((4, 4), np.uint8)
    rgb = np.full((4, 4, 3), (10, 20, 30), np.uint8)
    pal = Image.fromarray(np.zeros((4, 4), np.uint8), "P")
    pal.putpalette([10, 20, 30] + [0] * 765)
    pa = pal.copy().convert("PA")
    return [
        ("RGBA transparent -> white", Image.fromarray(np.dstack([rgb, alpha0]), "RGBA"), (255, 255, 255)),
        ("RGBA opaque -> colour", Image.fromarray(np.dstack([rgb, alpha0 + 255]), "RGBA"), (10, 20, 30)),
        ("LA: alpha dropped", _png(Image.fromarray(np.dstack([gray, alpha0]), "LA")), (60, 60, 60)),
        ("PA: alpha dropped", pa, (10, 20, 30)),
        ("P with transparency -> white", _png(pal, transparency=0), (255, 255, 255)),
        ("RGB tRNS colour key -> white", _png(Image.fromarray(rgb), transparency=(10, 20, 30)), (255, 255, 255)),
        ("L tRNS grey key -> white", _png(Image.fromarray(gray), transparency=60), (255, 255, 255)),
        ("L tRNS other key -> grey", _png(Image.fromarray(gray), transparency=61), (60, 60, 60)),
        ("RGB opaque", Image.fromarray(rgb), (10, 20, 30)),
    ]


@pytest.mark.parametrize(("name", "img", "expected"), _cases(), ids=[c[0] for c in _cases()])
def test_transparency_like_the_reference(name, img, expected):
    out = to_pil_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    assert tuple(int(v) for v in np.asarray(out)[0, 0]) == expected, name


def test_partial_alpha_is_pasted_onto_white():
    alpha = np.array([[0, 64, 128, 255]], np.uint8).repeat(4, 0)
    rgba = np.dstack([np.zeros((4, 4, 3), np.uint8), alpha])
    got = np.asarray(to_pil_rgb(rgba))[0, :, 0].astype(int)
    want = 255 - alpha[0].astype(int)  # black over white through alpha: 255 * (1 - a/255)
    assert np.abs(got - want).max() <= 1


# ---- answer text cut at the first <|im_end|> / <|im_start|> (bagel.py:1390, inferencer.py:278) --------------
def _reference_cut(generated: str) -> str:
    """The reference expression on its decoded sequence, which starts with the fed <|im_start|>."""
    return ("<|im_start|>" + generated).split("<|im_end|>")[0].split("<|im_start|>")[1]


@pytest.mark.parametrize(
    "text",
    ["plain answer", "", "a<|im_end|>b", "a<|im_start|>b<|im_end|>c", "<|im_end|>x", "x<|im_start|>", "<|im_", "é<|"],
)
def test_cut_answer_matches_the_reference_expression(text):
    assert cut_answer(text) == _reference_cut(text)


def test_streamed_answer_equals_the_cut_text_for_every_split():
    rng = np.random.default_rng(5)
    pieces = ["ab", "<|", "im_", "end", "|>", "<|im_start|>", "c", "<", "|im_star", "t|>", "é", "<|x"]
    for _ in range(300):
        text = "".join(rng.choice(pieces, size=int(rng.integers(0, 8))))
        cuts = sorted(set(rng.integers(0, len(text) + 1, size=3).tolist()))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        s = AnswerStream()
        streamed = "".join(s.push(d) for d in deltas) + s.flush()
        assert streamed == _reference_cut(text), (text, deltas)


def test_answer_text_is_cut_and_decoding_stops_at_im_start():
    """Weights edited so that <|im_start|> wins where the 3rd answer token did: the text ends before it."""
    from inference.engine import load_engine

    eng = load_engine("tiny")
    plain = eng.answer([], "Q", max_new_tokens=6)
    assert len(plain.token_ids) >= 3
    bos, third = eng.model.tokens.bos_token_id, plain.token_ids[2]
    with torch.no_grad():
        w = eng.model.language_model.lm_head.weight
        w[bos] = w[third] * 4  # logit(bos) = 4 * logit(third): the argmax wherever `third` led with logit > 0
    a = eng.answer([], "Q", max_new_tokens=6)
    k = a.token_ids.index(bos)
    assert a.token_ids[-1] == bos and k <= 2  # decoding stopped at <|im_start|>: nothing after it is kept
    assert a.text == _reference_cut(eng.tokenizer.decode(a.token_ids)) == eng.tokenizer.decode(a.token_ids[:k])
    assert "<|im_start|>" not in a.text


# ---- defaults with their reference source --------------------------------------------------------------
def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_text_to_image_defaults_are_interleave_inference():
    d = _defaults(Engine.generate_image)  # inferencer.py:558-568
    assert d["cfg_text_scale"] == 3.0 and d["cfg_img_scale"] == 1.5 and d["cfg_interval"] == (0.4, 1.0)
    assert d["timestep_shift"] == 3.0 and d["steps"] == 50 and d["cfg_renorm_type"] == "global"
    assert d["cfg_renorm_min"] == 0.0 and d["size"] == (1024, 1024)
    assert d["think"] is False and d["max_think_tokens"] == 1000


def test_edit_defaults_are_the_image_generator_script():
    d = _defaults(Engine.edit_image)  # interactive_image_generator.py:302-307, 367-369
    assert d["cfg_text_scale"] == 4.0 and d["cfg_img_scale"] == 2.0 and d["cfg_interval"] == (0.0, 1.0)
    assert d["cfg_renorm_type"] == "text_channel" and d["timestep_shift"] == 3.0 and d["steps"] == 50
    assert d["seed"] == 42 and d["describe_first"] is False and d["max_describe_tokens"] == 800


def test_answer_defaults_are_greedy():
    d = _defaults(Engine.answer)
    assert d["temperature"] == 0.0 and d["top_p"] == 1.0 and d["max_new_tokens"] == 512 and d["think"] is False


@pytest.mark.parametrize(
    ("size", "expected"),
    [((24, 24), (16, 16)), ((31, 47), (16, 32)), ((32, 48), (32, 48)), ((16, 100), (16, 96)), ((1000, 40), (512, 16))],
)
def test_generation_size_is_floored_like_the_reference(tiny, size, expected):
    # bagel.py:833 h, w = H // 16, W // 16; the tiny latent table holds 512 px (aspect kept, then floored)
    assert tiny._generation_size(size) == expected


def test_generated_image_has_the_floored_size(tiny):
    assert tiny.generate_image("x", size=(24, 40), steps=2).shape == (16, 32, 3)


# ---- resize exactly once: DICOM frames reach the engine at source size (transforms.py:87) -----------------
def _ct(rows: int, cols: int) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", generate_uid(), "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    yy, xx = np.mgrid[0:rows, 0:cols]
    ds.PixelData = (((xx * 7 + yy * 13) % 400) + 824).astype(np.uint16).tobytes()  # -200..199 HU texture
    return ds


def test_large_frames_are_resized_once_by_the_engine():
    ds = _ct(600, 1500)
    img = pp.series_to_images([ds], window=(0, 400))[0]
    assert img.pixels.shape == (600, 1500, 3) and not img.notes
    windowed = pp.to_rgb8(ds, pp.decode_frames(ds)[0], pp.Window(0, 400))
    assert np.array_equal(img.pixels, windowed)
    once = resize(Image.fromarray(windowed), VIT_CHAT)
    assert np.array_equal(np.asarray(resize(to_pil_rgb(img.pixels), VIT_CHAT)), np.asarray(once))
    # what the old 1024-px pre-shrink gave: a second resampling, visibly different
    pre = Image.fromarray(windowed).resize((1024, 410), Image.Resampling.BICUBIC)
    twice = np.asarray(resize(pre, VIT_CHAT)).astype(int)
    assert np.abs(twice - np.asarray(once).astype(int)).max() > 0


def test_elongated_frame_keeps_the_reference_vit_grid():
    ds = _ct(400, 20000)  # the case
    img = pp.series_to_images([ds], window=(0, 400))[0]
    assert img.pixels.shape[:2] == (400, 20000)
    assert VIT_CHAT.target_size(20000, 400) == (980, 28)  # from the original, as the reference: 70 x 2 patches
    assert VIT_CHAT.target_size(*pp.fit_within(400, 20000, 1024)[::-1]) == (980, 14)  # the old pre-shrink: 70 x 1


def test_only_frames_over_the_engine_limit_are_shrunk():
    assert pp.fit_within(600, 1500, None) == (600, 1500)
    r, c = pp.fit_within(5000, 4001, None)  # 20.005 MP, which the engine refuses
    assert r * c <= pp.MAX_ENGINE_PIXELS and abs(r / c - 5000 / 4001) < 1e-3
    assert pp.fit_within(600, 1500, 1000) == (400, 1000)


# ---- 16-bit and float inputs: documented scaling instead of clipping at 255 --------------------------------
@pytest.mark.parametrize(
    ("arr", "expected"),
    [
        (np.array([[0, 257, 4000, 65535]], np.uint16), [0, 1, 16, 255]),  # uint16 / 257
        (np.array([[0.0, 0.25, 0.5, 1.0]], np.float32), [0, 64, 128, 255]),  # float * 255, rounded
        (np.array([[0.0, 0.25, 0.5, 1.0]], np.float64), [0, 64, 128, 255]),
        (np.array([[0, 1, 128, 255]], np.int64), [0, 1, 128, 255]),  # other ints: already 8-bit values
    ],
)
def test_wide_arrays_are_scaled_not_clipped(arr, expected):
    out = np.asarray(to_pil_rgb(np.repeat(arr, 2, axis=0)))
    assert out[0, :, 0].tolist() == expected


def test_16_bit_png_reads_like_a_uint16_array():
    raw = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, "PNG")
    buf.seek(0)
    png = Image.open(buf)
    assert png.mode.startswith("I")
    assert np.array_equal(np.asarray(to_pil_rgb(png)), np.asarray(to_pil_rgb(raw)))
    assert np.asarray(to_pil_rgb(png)).max() == round(63000 / 257)  # not 255: no clipping
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")
    assert (np.asarray(to_pil_rgb(f)) == 128).all()


# ---- sampling options --------------------------------------------------------------------------------
def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    p = torch.tensor([[0.2, 0.5, 0.3]])
    assert torch.equal(nucleus(p, 0.6), torch.tensor([[0.0, 0.5, 0.3]]))
    assert torch.equal(nucleus(p, 0.5), torch.tensor([[0.0, 0.5, 0.0]]))
    assert torch.equal(nucleus(p, 1.0), p)
    assert torch.equal(nucleus(p, 1e-9), torch.tensor([[0.0, 0.5, 0.0]]))


def test_tiny_top_p_is_greedy_and_seeds_reproduce(tiny, gray_image):
    greedy = tiny.answer([], "Findings?", max_new_tokens=8)
    for seed in range(3):
        nuc = tiny.answer([], "Findings?", max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=seed)
        assert nuc.token_ids == greedy.token_ids
    kw = dict(max_new_tokens=8, temperature=1.5, top_p=0.9)
    runs = [tiny.answer([], "Findings?", seed=s, **kw).token_ids for s in (11, 11, 12, 13)]
    assert runs[0] == runs[1] and len({tuple(r) for r in runs}) > 1  # the seed reproduces and matters
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_p"):
            tiny.answer([gray_image], "q", temperature=1.0, top_p=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_tensors_of_every_precision_are_read_as_unit_range(dtype):
    assert (np.asarray(to_pil_rgb(torch.full((3, 5, 6), 0.5, dtype=dtype))) == 128).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_pil_rgb(torch.full((3, 5, 6), 300, dtype=dtype))
