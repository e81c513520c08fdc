"""Prompts and answer normalisation for the question-answering benchmarks.

UniMedVL's own ``codes/eval/`` tree (uni-medical/UniMedVL at 64a9915) holds only the model
loader (``codes/eval/vlm/utils.py``); the scoring scripts behind the published table are not
released. The protocol here is the one the table's peers use and the README credits:

* VQA-RAD / SLAKE / PathVQA: the LLaVA-Med convention (``llava/eval/run_eval.py``): a question
  is *closed* when the dataset marks it CLOSED (VQA-RAD ``answer_type``, SLAKE ``answer_type``)
  or, where the dataset has no such field (PathVQA), when the reference is yes/no; closed
  questions are scored by accuracy, open ones by recall of the reference's tokens. The headline
  figure is closed-question accuracy, as in HealthGPT's and UniMedVL's tables.
* OmniMedVQA: VLMEvalKit's multiple-choice prompt (``vlmeval/dataset/image_mcq.py``:
  "Question: ...\\nOptions:\\nA. ...\\nPlease select the correct answer from the options above.")
  and its rule-based answer matching (``vlmeval/utils/matching_util.py`` ``can_infer``): one
  option letter standing alone, else exactly one option's text in the answer.

Differences from LLaVA-Med that are deliberate (tested in tests/evaluation/test_answers.py): a
yes/no reference is matched against the first yes/no *word* of the prediction, not by substring
(LLaVA-Med counts "not sure" as "no" because "no" is a substring of "not").
"""

from __future__ import annotations

import re
import string

YES_NO = ("yes", "no")
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
# an option letter as an answer: "B", "B.", "(B)", "B) MRI", "Answer: B" -- not the article in "A CT scan"
_LETTER = re.compile(r"(?:^|[\s(\[:])([A-Z])(?=[.):\],]|\s*$)")


def normalize(text: str) -> str:
    """Lower-case, punctuation to spaces, articles dropped, whitespace collapsed (LLaVA-Med
    ``normalize_word`` plus the SQuAD article rule)."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def is_yes_no(reference: str) -> bool:
    return normalize(reference) in YES_NO


def first_yes_no(prediction: str) -> str | None:
    """The first standalone "yes" or "no" in the prediction, or None."""
    for w in tokens(prediction):
        if w in YES_NO:
            return w
    return None


def closed_correct(prediction: str, reference: str) -> bool:
    """Closed question: a yes/no reference must equal the prediction's first yes/no word; any other
    closed reference (e.g. SLAKE's "Which is larger, the liver or the spleen?") must appear as a
    whole-word phrase in the normalised prediction."""
    ref = normalize(reference)
    if ref in YES_NO:
        return first_yes_no(prediction) == ref
    pred = normalize(prediction)
    return bool(ref) and re.search(rf"(?<!\S){re.escape(ref)}(?!\S)", pred) is not None


def open_recall(prediction: str, reference: str) -> float:
    """Open question: share of the reference's distinct tokens found in the prediction (LLaVA-Med
    ``calculate_f1score`` recall). Raises ValueError for a reference with no token."""
    ref = set(tokens(reference))
    if not ref:
        raise ValueError("empty reference answer")
    return len(ref & set(tokens(prediction))) / len(ref)


def vqa_prompt(question: str, yes_no: bool) -> str:
    """The question as asked: verbatim (``Bagel.chat`` takes the prompt as is); closed yes/no
    questions get "Answer yes or no.", the others the short-answer hint (LLaVA-1.5 VQA prompts)."""
    q = str(question).strip()
    return f"{q}\nAnswer yes or no." if yes_no else f"{q}\nAnswer the question using a single word or phrase."


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's multiple-choice prompt (``image_mcq.py`` ``build_prompt``), right-stripped."""
    text = f"Hint: {hint}\n" if hint else ""
    text += f"Question: {question}\n"
    if options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        text += "Please select the correct answer from the options above. \n"
    return text.rstrip()


def mcq_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text answer selects, or None (VLMEvalKit ``can_infer``: exactly one
    option letter given as an answer, else exactly one option text contained in the answer; a capital
    "A" used as an article is not a letter)."""
    letters = {m for m in _LETTER.findall(str(prediction)) if m in options}
    if len(letters) == 1:
        return letters.pop()
    pred = normalize(prediction)
    hits = [k for k, v in options.items() if normalize(v) and normalize(v) in pred]
    return hits[0] if len(hits) == 1 else None
