"""Answer normalisation, closed/open scoring and multiple-choice matching against hand-worked cases."""

from __future__ import annotations

import pytest

from inference.evaluation.answers import (
    closed_correct,
    first_yes_no,
    mcq_choice,
    mcq_prompt,
    normalize,
    open_recall,
    vqa_prompt,
)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Yes.", "yes", True),
        ("YES, there is a mass", "Yes", True),
        ("No, the heart is not enlarged.", "no", True),
        ("There is no effusion", "no", True),  # the first yes/no word decides
        ("yes", "no", False),
        ("Not sure", "no", False),  # LLaVA-Med's substring rule counts this as "no"
        ("nothing abnormal", "no", False),
        ("", "yes", False),
        ("The liver.", "liver", True),  # closed, not yes/no: whole-word phrase
        ("the left lung", "Left Lung", True),
        ("deliver", "liver", False),
    ],
)
def test_closed_answers(prediction: str, reference: str, expected: bool) -> None:
    assert closed_correct(prediction, reference) is expected


def test_substring_rule_difference() -> None:
    """The documented difference from LLaVA-Med: "no" is a substring of "not" but not its first yes/no word."""
    assert "no" in normalize("Not sure")  # what the substring rule sees
    assert first_yes_no("Not sure") is None
    assert closed_correct("Not sure", "no") is False


def test_open_recall_hand_computed() -> None:
    assert open_recall("the left lung and the heart", "left lung") == 1.0
    assert open_recall("right lung", "left lung") == 0.5  # 1 of 2 reference tokens
    assert open_recall("nothing", "The Liver") == 0.0  # article dropped: one token, not found
    with pytest.raises(ValueError, match="empty reference"):
        open_recall("x", " the ")


def test_prompts() -> None:
    assert vqa_prompt(" Is there a mass? ", yes_no=True) == "Is there a mass?\nAnswer yes or no."
    assert vqa_prompt("Where?", yes_no=False).endswith("using a single word or phrase.")
    p = mcq_prompt("What modality?", {"A": "CT", "B": "MRI"})
    assert p == (
        "Question: What modality?\nOptions:\nA. CT\nB. MRI\nPlease select the correct answer from the options above."
    )


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"),
        ("B. MRI", "B"),
        ("The answer is (A).", "A"),
        ("magnetic resonance: MRI", "B"),  # no letter: the one option text contained
        ("CT or MRI", None),  # two option texts
        ("A, B", None),  # two letters
        ("I cannot tell", None),
        ("Answer: C", "C"),
        ("A MRI of the brain.", "B"),  # "A" is an article here: the option text decides
    ],
)
def test_mcq_choice(prediction: str, expected: str | None) -> None:
    assert mcq_choice(prediction, {"A": "CT", "B": "MRI", "C": "X-ray"}) == expected
