"""Rule parameters for the model engine (think, describe_first, sampling, guidance) reach the engine calls."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.routing import TaskSpec
from inference.pipelines import PipelineError, parse_params, run_task
from inference.pipelines.base import clean_text
from inference.preprocess import series_to_images
from tests.pipelines.conftest import FAST

OPTIONS = {
    "think": True,
    "max_think_tokens": 4,
    "cfg_text_scale": 2.5,
    "cfg_interval": [0.1, 0.9],
    "timestep_shift": 2.0,
}


@pytest.fixture
def calls(engine, monkeypatch):
    """Every engine call's keyword arguments, recorded on the way to the real methods."""
    seen: list[tuple[str, dict]] = []
    for name in ("answer", "report", "generate_image", "edit_image"):
        real = getattr(engine, name)

        def record(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(engine, name, record)
    return seen


@pytest.mark.parametrize(
    ("kind", "extra", "call"),
    [
        ("translate", {"prompt": "to T2", "describe_first": True}, "edit_image"),
        ("segment", {"targets": [{"label": "lesion"}], "slices": "middle"}, "edit_image"),
        ("synthesize", {"prompt": "a chest CT slice", "size": [32, 32]}, "generate_image"),
    ],
)
def test_image_tasks_pass_think_and_guidance(engine, ct_series, calls, kind, extra, call):
    params = {**FAST, "slices": "middle", **OPTIONS, **extra}
    run_task(kind, ct_series, TaskSpec(kind=kind, **params).parameters(), engine)
    kwargs = [kw for name, kw in calls if name == call]
    assert kwargs
    for kw in kwargs:
        assert kw["think"] is True and kw["cfg_text_scale"] == 2.5 and kw["cfg_interval"] == (0.1, 0.9)
        assert kw["timestep_shift"] == 2.0 and "cfg_img_scale" not in kw  # unset: the engine's reference default
        assert kw.get("describe_first", False) is extra.get("describe_first", False)
        assert kw["max_think_tokens"] == 4 and kw.get("max_describe_tokens", 4) == 4


def test_text_tasks_pass_think_and_sampling(engine, cr_image, calls):
    params = {**FAST, "think": True, "temperature": 0.7, "top_p": 0.8, "questions": ["Effusion?"]}
    run_task("vqa", [cr_image], TaskSpec(kind="vqa", **params).parameters(), engine)
    run_task("report", [cr_image], TaskSpec(kind="report", **FAST, think=True).parameters(), engine)
    (vqa,) = [kw for name, kw in calls if name == "answer" and "instruction" not in kw][:1]
    (report,) = [kw for name, kw in calls if name == "report"]
    assert (vqa["think"], vqa["temperature"], vqa["top_p"], vqa["seed"]) == (True, 0.7, 0.8, 0)
    assert (report["think"], report["temperature"], report["top_p"]) == (True, 0.0, 1.0)


def test_think_answer_is_what_the_engine_gives(engine, cr_image):
    out = run_task("vqa", [cr_image], {**FAST, "questions": ["Effusion?"], "think": True}, engine)
    pixels = [i.pixels for i in series_to_images([cr_image], slices="key:3")]
    want = engine.answer(pixels, "Effusion?", max_new_tokens=8, seed=0, think=True).text
    assert out.results[0]["qa"][0]["answer"] == (clean_text(want) or "(no answer)")


def test_think_synthesis_is_what_the_engine_gives(engine, ct_series):
    params = {**FAST, "prompt": "a chest CT slice", "size": [32, 32], "think": True, "max_think_tokens": 5}
    out = run_task("synthesize", ct_series, params, engine)
    want = engine.generate_image("a chest CT slice", size=(32, 32), steps=2, seed=0, think=True, max_think_tokens=5)
    stored = out.objects[0].dataset.pixel_array
    assert np.array_equal(stored, want[..., 0] if stored.ndim == 2 else want)


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("report", {"describe_first": True}, "describe_first applies to"),
        ("report", {"think": "yes"}, "think must be true or false"),
        ("vqa", {"questions": ["q"], "top_p": 0}, "top_p"),
        ("vqa", {"questions": ["q"], "temperature": -1}, "temperature"),
        ("translate", {"prompt": "p", "cfg_interval": [0.5]}, "cfg_interval"),
        ("translate", {"prompt": "p", "cfg_text_scale": "high"}, "cfg_text_scale must be a number"),
    ],
)
def test_bad_engine_options_are_refused_with_a_reason(kind, params, message):
    with pytest.raises(PipelineError, match=message):
        parse_params(kind, params)


def test_rule_options_validate_and_keep_old_idempotency_keys():
    plain = TaskSpec(kind="report")
    assert "think" not in plain.parameters() and "top_p" not in plain.parameters()  # keys of old rules unchanged
    assert TaskSpec(kind="report", think=True).parameters()["think"] is True
    assert TaskSpec(kind="segment", targets=[{"label": "x"}], describe_first=True).describe_first
    with pytest.raises(ValueError, match="describe_first applies to"):
        TaskSpec(kind="vqa", questions=["q"], describe_first=True)
    with pytest.raises(ValueError, match="cfg_interval"):
        TaskSpec(kind="synthesize", prompt="p", cfg_interval=(0.9, 0.1))
    with pytest.raises(ValueError):
        TaskSpec(kind="report", top_p=0)
