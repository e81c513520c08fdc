"""The pipelines' own mapping code, without a model: report parsing, parameters, the inverse
window, overlap resolution, series grouping and provenance."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from inference.pipelines import PipelineError, parse_params, provenance_from_engine, run_task
from inference.pipelines.base import PipelineOutput, clean_text, group_series
from inference.pipelines.image_to_image import unwindow
from inference.pipelines.report import NO_IMPRESSION, split_report
from inference.pipelines.segment import resolve_overlaps
from inference.preprocess import Window, apply_window

# --------------------------------------------------------------------------- report text


@pytest.mark.parametrize(
    ("text", "findings", "impression"),
    [
        ("Findings: Clear lungs.\nImpression: Normal chest.", "Clear lungs.", "Normal chest."),
        ("FINDINGS:\nClear lungs.\n\nIMPRESSION:\nNormal chest.", "Clear lungs.", "Normal chest."),
        ("**Findings:** Clear lungs.\n**Impression:** Normal.", "Clear lungs.", "Normal."),
        ("## Findings\nClear lungs.\n## Impressions\nNormal.", "Clear lungs.", "Normal."),
        ("findings: a. Impression: b.", "a.", "b."),
        ("Chest PA.\nFindings: Clear lungs.\nConclusion: Normal.", "Chest PA.\n\nClear lungs.", "Normal."),
        ("Impression: Normal.", "", "Normal."),
        ("Findings: Clear lungs.", "Clear lungs.", NO_IMPRESSION),
        ("The lungs are clear. No effusion.", "The lungs are clear. No effusion.", NO_IMPRESSION),
        # a word that merely contains a heading name inside a sentence is not a heading
        (
            "No new findings compared to prior. Heart normal.",
            "No new findings compared to prior. Heart normal.",
            NO_IMPRESSION,
        ),
        ("  \n\x00 ", "", ""),
    ],
)
def test_report_text_is_split_into_findings_and_impression(text, findings, impression) -> None:
    assert split_report(text) == (findings, impression)


def test_model_text_loses_control_characters_but_keeps_lines() -> None:
    # U+FFFD stays: it honestly marks bytes the tokenizer could not decode
    assert clean_text("a\x00b\x1b\r\nc\n\n\n\nd\ufffd ") == "ab\nc\n\nd\ufffd"


# --------------------------------------------------------------------------- parameters


def test_parameters_from_a_routing_rule_are_typed() -> None:
    params = {
        "kind": "segment",
        "prompt": None,
        "questions": [],
        "targets": [
            {
                "label": "liver",
                "category": {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"},
                "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
                "instruction": None,
                "threshold": 100,
            },
            {"label": "lesion"},
        ],
        "slices": "every:2",
        "window": [40, 400],  # JSON form of the (center, width) tuple
        "destinations": None,
        "max_new_tokens": 512,
        "steps": 4,
        "seed": 7,
        "size": None,
        "labelmap": True,
    }
    p = parse_params("segment", params)
    assert p.window == (40.0, 400.0) and p.steps == 4 and p.seed == 7 and p.labelmap
    liver, lesion = p.targets
    assert liver.instruction == "Segment the liver." and liver.threshold == 100
    assert liver.property_type.meaning == "Liver" and liver.category.value == "85756007"
    assert lesion.property_type.value == "52988006" and lesion.threshold == 128


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("vqa", {"questions": []}, "needs at least one question"),
        ("segment", {"targets": []}, "needs at least one target"),
        ("segment", {"targets": [{"label": "a"}, {"label": "a"}]}, "unique"),
        ("segment", {"targets": [{"label": ""}]}, "needs a label"),
        ("segment", {"targets": [{"label": "a", "threshold": 0}]}, "outside 1..255"),
        ("translate", {"prompt": "  "}, "needs a prompt"),
        ("synthesize", {"prompt": "x", "size": [8, 8]}, "outside 16..4096"),
        ("report", {"window": [1, 2, 3]}, "window must be"),
        ("report", {"steps": "many"}, "must be an integer"),
        ("report", {"kind": "vqa"}, "does not match"),
        ("classify", {}, "unknown task kind"),
    ],
)
def test_bad_parameters_are_refused_with_a_reason(kind, params, message) -> None:
    with pytest.raises(PipelineError, match=message):
        parse_params(kind, params)


# --------------------------------------------------------------------------- inverse window


@pytest.mark.parametrize("window", [Window(40.0, 400.0), Window(-600.0, 1500.0), Window(2048.0, 4096.0)])
def test_unwindow_inverts_the_preprocessing_window(window) -> None:
    values = np.linspace(window.center - window.width / 2 + 1, window.center + window.width / 2 - 1, 200)
    gray = apply_window(values.astype(np.float32), window)
    back = unwindow(gray, window)
    step = window.width / 255.0  # one gray level in modality units
    assert np.max(np.abs(back - values)) <= step
    # and the window maps the recovered values to the same gray levels again
    assert np.array_equal(apply_window(back.astype(np.float32), window), gray)


# --------------------------------------------------------------------------- segmentation helpers


def test_labelmap_overlaps_go_to_the_first_target() -> None:
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, :2] = True
    masks[1, 1:3] = True
    masks[2, 3] = True
    out, moved = resolve_overlaps(masks)
    assert moved == 4  # row 1 of target 2
    assert out[0, :2].all() and not out[1, 1].any() and out[1, 2].all() and out[2, 3].all()
    assert out.sum(axis=0).max() == 1


# --------------------------------------------------------------------------- series and provenance


def test_series_are_grouped_sorted_and_deduplicated(ct_series) -> None:
    other = copy.deepcopy(ct_series[:2])
    for i, d in enumerate(other):
        d.SeriesInstanceUID = "1.2.3.4"
        d.SOPInstanceUID = f"1.2.3.4.{i}"
    shuffled = [ct_series[3], other[0], ct_series[0], ct_series[3], *ct_series[1:3], other[1]]
    out = PipelineOutput(task="report")
    groups = group_series(shuffled, out)
    assert [g.series_instance_uid for g in groups] == [str(ct_series[0].SeriesInstanceUID), "1.2.3.4"]
    # slice order along the normal, the duplicate of slice 3 analysed once
    assert [d.SOPInstanceUID for d in groups[0].datasets] == [d.SOPInstanceUID for d in ct_series[:4]]


def test_instances_of_two_studies_are_refused(ct_series, cr_image) -> None:
    with pytest.raises(PipelineError, match="exactly one study"):
        group_series([*ct_series, cr_image], PipelineOutput(task="report"))
    with pytest.raises(PipelineError, match="no instances"):
        group_series([], PipelineOutput(task="report"))


def test_provenance_comes_from_engine_info() -> None:
    info = {"model_name": "UniMedVL", "version": "1.0", "checkpoint_sha256": "ab" * 32, "is_demo": True}
    prov = provenance_from_engine(info, institution_name="Klinikum")
    assert (prov.model_name, prov.model_version, prov.is_demo) == ("UniMedVL", "1.0", True)
    assert prov.checkpoint_hash == "ab" * 32 and prov.institution_name == "Klinikum"


def test_understanding_calls_get_at_most_max_images_evenly_spaced() -> None:
    from inference.pipelines.report import MAX_IMAGES, _at_most
    from inference.preprocess import ModelImage

    images = [ModelImage(np.zeros((2, 2, 3), np.uint8), f"1.2.{i}", 0, 2, 2, None) for i in range(3 * MAX_IMAGES)]
    out = PipelineOutput(task="report")
    kept = _at_most(images, out)
    assert len(kept) == MAX_IMAGES and kept[0] is images[0] and kept[-1] is images[-1]
    assert "model looked at" in out.notes[0]
    assert _at_most(images[:3], PipelineOutput(task="report")) == images[:3]


# --------------------------------------------------------------------------- fail before the model runs


def test_sources_that_cannot_carry_the_result_fail_before_any_model_call(cr_image, ct_series) -> None:
    # engine=None: these must be refused from the headers alone, without spending model time
    seg = {"kind": "segment", "targets": [{"label": "nodule"}], "slices": "all"}
    with pytest.raises(PipelineError, match="has no Frame of Reference UID"):
        run_task("segment", [cr_image], seg, engine=None)
    colour = copy.deepcopy(ct_series)
    colour[0].PhotometricInterpretation = "RGB"
    with pytest.raises(PipelineError, match="needs monochrome images; this series is MONOCHROME2, RGB"):
        run_task("translate", colour, {"kind": "translate", "prompt": "to MR"}, engine=None)
    enhanced = copy.deepcopy(ct_series[:1])
    enhanced[0].NumberOfFrames = 2
    with pytest.raises(PipelineError, match="single-frame sources only"):
        run_task("super_resolve", enhanced, {"kind": "super_resolve", "prompt": "sharpen"}, engine=None)


def test_frame_keys_follow_the_writer_convention() -> None:
    from inference.pipelines.segment import frame_key
    from inference.preprocess import ModelImage

    img = ModelImage(np.zeros((2, 2, 3), np.uint8), "1.2.3", 4, 2, 2, None)
    assert frame_key(img, multiframe=False) == "1.2.3"
    assert frame_key(img, multiframe=True) == ("1.2.3", 5)  # frame numbers start at 1
