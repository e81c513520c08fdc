"""Think mode and describe-then-edit against the reference flow, transcribed on the engine's block primitives.

``reference_interleave`` follows ``InterleaveInferencer.interleave_inference`` (inferencer.py:552-638) step by
step: which context each block enters, where cfg_text is copied, that the decoded plan joins gen only, and
``gen_text``'s loop bound and text cut (inferencer.py:258-279, bagel.py:1236-1311). The engine's API must give
the same contexts, plan and pixels. Randomness follows the engine's documented convention (one CPU generator
seeded with ``seed``: VAE posterior eps first, then the initial noise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.engine.api import (
    GEN_THINK_SYSTEM_PROMPT,
    THINK_ANALYSIS_PROMPT,
    VLM_THINK_SYSTEM_PROMPT,
)
from inference.engine.sampler import SamplerSettings, sample_latent
from inference.engine.transforms import VAE_EDIT, VIT_INTERLEAVE, ResizeRule, resize, to_model_tensor, to_pil_rgb

T2I = SamplerSettings(steps=3, cfg_text_scale=3.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0))
EDIT = SamplerSettings(steps=3, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                       cfg_renorm_type="text_channel")  # fmt: skip


def gen_text(eng, ctx, max_length: int) -> str:
    """inferencer.py:258-279 on a copy of ctx: greedy loop of max_length steps counting the fed <|im_start|>."""
    res = eng.decode_text(ctx.fork(), max_new_tokens=max_length - 1)
    seq = eng.tokenizer.decode([eng.model.tokens.bos_token_id, *res.token_ids])
    return seq.split("<|im_end|>")[0].split("<|im_start|>")[1]


@torch.inference_mode()
def reference_interleave(eng, inputs, *, think, understanding_output, max_think=1000, size=None, settings=None,
                         seed=0, vae_rule: ResizeRule = VAE_EDIT):  # fmt: skip
    """inferencer.py:584-638. Returns (texts, image or None, (gen, cfg_text, cfg_img) given to the sampler)."""
    m, tok = eng.model, eng.tokenizer
    rng = torch.Generator().manual_seed(seed)
    gen = eng.new_context()
    cfg_img = eng.new_context()  # :587 deepcopy of the empty context
    cfg_text = None
    out: list = []
    if think:  # :590-596
        system = tok.encode(VLM_THINK_SYSTEM_PROMPT if understanding_output else GEN_THINK_SYSTEM_PROMPT)
        m.append_text(gen, system)
        m.append_text(cfg_img, system)
    for term in inputs:
        if isinstance(term, str):  # :599-602
            cfg_text = gen.fork()
            m.append_text(gen, tok.encode(term))
            m.append_text(cfg_img, tok.encode(term))
        else:  # :604-607, update_context_image :138-156 (VAE block then ViT block)
            img = resize(to_pil_rgb(term), vae_rule)
            if not understanding_output:
                eps = torch.randn(1, 16, img.size[1] // 8, img.size[0] // 8, generator=rng)
                m.append_vae_latent(gen, eng.vae_encode(to_model_tensor(img), eps))
            m.append_vit_tokens(gen, eng.vit_tokens([to_model_tensor(resize(img, VIT_INTERLEAVE))])[0])
            cfg_text = gen.fork()
            size = (img.size[1], img.size[0])
    if understanding_output:  # :612-614
        return [gen_text(eng, gen, max_think)], None, None
    if think:  # :617-620
        plan = gen_text(eng, gen, max_think)
        m.append_text(gen, tok.encode(plan))
        out.append(plan)
    h, w = size[0] // 16, size[1] // 16
    noise = torch.randn(h * w, 64, generator=rng)
    x = sample_latent(m, gen, cfg_text, cfg_img, noise, (h, w), settings)
    return out, eng._to_numpy_image(x, size), (gen, cfg_text, cfg_img)


@pytest.fixture
def captured(tiny, monkeypatch):
    """The contexts the engine hands its sampler (a pass-through recorder on the real method)."""
    seen: list = []
    real = tiny.sample_image_latent

    def record(gen, cfg_text, cfg_img, *args, **kwargs):
        seen.append((gen.fork(), cfg_text.fork(), cfg_img.fork() if cfg_img is not gen else None))
        return real(gen, cfg_text, cfg_img, *args, **kwargs)

    monkeypatch.setattr(tiny, "sample_image_latent", record)
    return seen


def layout(ctx) -> list[tuple]:
    return [(b.kind, b.kv_start, b.n_tokens, b.rope_start, b.token_ids) for b in ctx.blocks]


def text_block(eng, text: str) -> list[int]:
    t = eng.model.tokens
    return [t.bos_token_id, *eng.tokenizer.encode(text), t.eos_token_id]


def test_think_understanding_is_the_reference_flow(tiny, gray_image):
    want, _, _ = reference_interleave(tiny, [gray_image, "What is shown?"], think=True, understanding_output=True,
                                      max_think=9)  # fmt: skip
    pieces: list[str] = []
    a = tiny.answer([gray_image], "What is shown?", think=True, max_new_tokens=8, on_token=pieces.append)
    assert a.text == want[0] == "".join(pieces)
    # prefill = system block + ViT block of the VAE-then-ViT resized image (48x32 -> 574x392: 41x28) + question
    n_sys = len(text_block(tiny, VLM_THINK_SYSTEM_PROMPT))
    assert a.n_prompt_tokens == n_sys + (41 * 28 + 2) + len(text_block(tiny, "What is shown?"))
    plain = tiny.answer([gray_image], "What is shown?", max_new_tokens=8)
    assert plain.n_prompt_tokens != a.n_prompt_tokens


def test_think_text_to_image_is_the_reference_flow(tiny, captured):
    plans: list[str] = []
    got = tiny.generate_image("a chest radiograph", size=(32, 48), steps=3, seed=5, think=True, max_think_tokens=7,
                              on_text=plans.append)  # fmt: skip
    texts, want, (gen, cfg_text, cfg_img) = reference_interleave(
        tiny, ["a chest radiograph"], think=True, understanding_output=False, max_think=7, size=(32, 48),
        settings=T2I, seed=5)  # fmt: skip
    assert plans == texts
    assert np.array_equal(got, want)
    g, ct, ci = captured[-1]
    assert layout(g) == layout(gen) and layout(ct) == layout(cfg_text) and layout(ci) == layout(cfg_img)
    sys_ids, prompt = text_block(tiny, GEN_THINK_SYSTEM_PROMPT), text_block(tiny, "a chest radiograph")
    assert [b.token_ids for b in g.blocks] == [sys_ids, prompt, text_block(tiny, plans[0])]  # plan: gen only
    assert [b.token_ids for b in ct.blocks] == [sys_ids]  # the text-CFG context is the system prompt alone
    assert [b.token_ids for b in ci.blocks] == [sys_ids, prompt]
    assert not np.array_equal(got, tiny.generate_image("a chest radiograph", size=(32, 48), steps=3, seed=5))


def test_think_edit_is_the_reference_flow(tiny, captured, gray_image):
    plans: list[str] = []
    got = tiny.edit_image(gray_image, "raise the contrast", steps=3, seed=2, think=True, max_think_tokens=6,
                          on_text=plans.append)  # fmt: skip
    texts, want, (gen, cfg_text, cfg_img) = reference_interleave(
        tiny, [gray_image, "raise the contrast"], think=True, understanding_output=False, max_think=6,
        settings=EDIT, seed=2)  # fmt: skip
    assert plans == texts
    assert np.array_equal(got, want) and got.shape == (32, 48, 3)
    g, ct, ci = captured[-1]
    assert layout(g) == layout(gen) and layout(ct) == layout(cfg_text) and layout(ci) == layout(cfg_img)
    assert [b.kind for b in g.blocks] == ["text", "vae", "vit", "text", "text"]
    assert [b.kind for b in ct.blocks] == ["text", "vae", "vit"]
    assert [b.token_ids for b in ci.blocks] == [text_block(tiny, GEN_THINK_SYSTEM_PROMPT),
                                                text_block(tiny, "raise the contrast")]  # fmt: skip


def test_describe_then_edit_is_the_image_generator_script(tiny, gray_image):
    """interactive_image_generator.py:344-366: understand [image, instruction], edit with instruction + text."""
    seen: list[str] = []
    got = tiny.edit_image(gray_image, "raise the contrast", steps=2, seed=1, describe_first=True,
                          max_describe_tokens=6, on_text=seen.append)  # fmt: skip
    (desc,), _, _ = reference_interleave(tiny, [gray_image, "raise the contrast"], think=False,
                                         understanding_output=True, max_think=6)  # fmt: skip
    assert seen == [desc] and desc
    direct = tiny.edit_image(gray_image, f"raise the contrast\n\n{desc}", steps=2, seed=1)
    assert np.array_equal(got, direct)


def test_describe_with_think_is_the_scripts_analysis_step(tiny, gray_image):
    """interactive_image_generator.py:329-342: think analysis prompt, "Based on analysis:", edit without think."""
    seen: list[str] = []
    got = tiny.edit_image(gray_image, "raise the contrast", steps=2, seed=1, describe_first=True, think=True,
                          max_describe_tokens=6, on_text=seen.append)  # fmt: skip
    prompt = THINK_ANALYSIS_PROMPT.format(instruction="raise the contrast")
    assert prompt == "Analyze this medical image and develop an editing strategy for: 'raise the contrast'."
    (analysis,), _, _ = reference_interleave(tiny, [gray_image, prompt], think=True, understanding_output=True,
                                             max_think=6)  # fmt: skip
    assert seen == [analysis] and analysis
    direct = tiny.edit_image(gray_image, f"raise the contrast\n\nBased on analysis: {analysis}", steps=2, seed=1)
    assert np.array_equal(got, direct)


def test_think_options_are_checked(tiny, gray_image):
    with pytest.raises(ValueError, match="max_think_tokens"):
        tiny.generate_image("x", size=(16, 16), steps=2, think=True, max_think_tokens=1)
    und = pytest.importorskip("inference.engine").load_engine("tiny", parts="understanding")
    assert und.answer([], "q", think=True, max_new_tokens=2).n_images == 0
