"""Readers for the question-answering and report benchmarks, each in its released layout.

Every reader takes the dataset folder, checks the layout before any model time is spent and raises
:class:`DatasetError` naming the file for anything missing, malformed or empty.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

from .answers import is_yes_no, mcq_prompt, vqa_prompt
from .items import Dataset, DatasetError, Item, Source, inside

REPORT_INSTRUCTION = "Write a radiology report with Findings and Impression."


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc})") from exc


def _need(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path} is missing: expected {layout}")
    return path


def _field(entry: Any, key: str, path: Path, index: int) -> str:
    if not isinstance(entry, dict) or key not in entry:
        raise DatasetError(f"{path}: entry {index} has no {key!r}")
    value = str(entry[key]).strip()
    if not value:
        raise DatasetError(f"{path}: entry {index} has an empty {key!r}")
    return value


def _questions(root: Path, ann_name: str, images_name: str, layout: str) -> tuple[Path, Path, list]:
    """(annotation file, image folder, its non-empty list of entries) of a JSON question release."""
    ann = _need(root / ann_name, layout)
    images = root / images_name
    if not images.is_dir():
        raise DatasetError(f"{images} is missing: expected {layout}")
    data = _json(ann)
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{ann}: expected a non-empty list of questions")
    return ann, images, data


def _vqa_item(root: Path, item_id: str, image: Path, question: str, answer: str, closed: bool) -> Item:
    return Item(
        id=item_id,
        task="vqa",
        inputs=[Source(str(image.relative_to(root)))],
        prompt=vqa_prompt(question, is_yes_no(answer)),
        reference=answer,
        answer_type="closed" if closed else "open",
    )


VQA_RAD_LAYOUT = "the OSF release: 'VQA_RAD Dataset Public.json' and 'VQA_RAD Image Folder/'"


def read_vqa_rad(root: Path) -> Dataset:
    """VQA-RAD (Lau et al. 2018, OSF release): ``VQA_RAD Dataset Public.json`` (entries with ``qid``,
    ``image_name``, ``question``, ``answer``, ``answer_type`` CLOSED/OPEN, ``phrase_type``) and
    ``VQA_RAD Image Folder/``. The test set is the entries whose ``phrase_type`` starts with "test"
    (test_freeform + test_para, 451 questions)."""
    ann, images, data = _questions(root, "VQA_RAD Dataset Public.json", "VQA_RAD Image Folder", VQA_RAD_LAYOUT)
    test = [e for e in data if isinstance(e, dict) and str(e.get("phrase_type", "")).startswith("test")]
    notes = [] if test else [f"{ann.name}: no phrase_type 'test*' entries; every question is scored"]
    items = []
    for i, e in enumerate(test or data):
        ans = _field(e, "answer", ann, i)
        kind = _field(e, "answer_type", ann, i).upper()
        img = inside(images, _field(e, "image_name", ann, i), ann)
        qid = str(e.get("qid", i))
        items.append(_vqa_item(root, qid, img, _field(e, "question", ann, i), ans, kind == "CLOSED"))
    return Dataset("vqa-rad", root, items, [ann], notes)


SLAKE_LAYOUT = "the SLAKE 1.0 release: test.json and imgs/"


def read_slake(root: Path) -> Dataset:
    """SLAKE 1.0 (Liu et al. 2021), English questions of ``test.json`` (``q_lang`` "en"; ``qid``,
    ``img_name``, ``question``, ``answer``, ``answer_type`` CLOSED/OPEN), images under ``imgs/``."""
    ann, images, data = _questions(root, "test.json", "imgs", SLAKE_LAYOUT)
    items = []
    for i, e in enumerate(data):
        if not isinstance(e, dict) or e.get("q_lang", "en") != "en":
            continue
        ans = _field(e, "answer", ann, i)
        img = inside(images, _field(e, "img_name", ann, i), ann)
        closed = _field(e, "answer_type", ann, i).upper() == "CLOSED"
        items.append(_vqa_item(root, str(e.get("qid", i)), img, _field(e, "question", ann, i), ans, closed))
    if not items:
        raise DatasetError(f"{ann}: no English (q_lang 'en') question")
    return Dataset("slake", root, items, [ann])


class _PlainUnpickler(pickle.Unpickler):
    """PathVQA ships its questions as a pickle: load plain containers only, never code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")


PATHVQA_LAYOUT = "the PathVQA release: qas/test/test_qa.pkl and images/test/"


def read_pathvqa(root: Path) -> Dataset:
    """PathVQA (He et al. 2020) release: ``qas/test/test_qa.pkl`` (a list of dicts with ``image``,
    ``question``, ``answer``) and ``images/test/<image>.jpg``. No answer-type field: yes/no answers are
    the closed questions (the convention of LLaVA-Med and HealthGPT)."""
    ann = _need(root / "qas" / "test" / "test_qa.pkl", PATHVQA_LAYOUT)
    images = root / "images" / "test"
    if not images.is_dir():
        raise DatasetError(f"{images} is missing: expected {PATHVQA_LAYOUT}")
    try:
        data = _PlainUnpickler(io.BytesIO(ann.read_bytes())).load()
    except Exception as exc:
        raise DatasetError(f"{ann}: not a readable list of questions ({exc})") from exc
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{ann}: expected a non-empty list of questions")
    items = []
    for i, e in enumerate(data):
        ans = _field(e, "answer", ann, i)
        name = _field(e, "image", ann, i)
        img = inside(images, name if Path(name).suffix else f"{name}.jpg", ann)
        items.append(_vqa_item(root, f"{i}", img, _field(e, "question", ann, i), ans, is_yes_no(ans)))
    return Dataset("pathvqa", root, items, [ann])


OMNI_LAYOUT = "the OmniMedVQA release: QA_information/<access>/*.json and Images/"


def read_omnimedvqa(root: Path) -> Dataset:
    """OmniMedVQA (Hu et al. 2024): ``QA_information/Open-access/*.json`` (and ``Restricted-access``
    when present): entries with ``question_id``, ``question``, ``gt_answer``, ``image_path`` (relative to
    the root) and ``option_A``..``option_D``. Scored as multiple choice."""
    qa = root / "QA_information"
    files = sorted(qa.glob("*/*.json")) if qa.is_dir() else []
    if not files:
        raise DatasetError(f"{qa}: no */*.json question file; expected {OMNI_LAYOUT}")
    items = []
    for ann in files:
        data = _json(ann)
        if not isinstance(data, list):
            raise DatasetError(f"{ann}: expected a list of questions")
        for i, e in enumerate(data):
            keys = ("option_A", "option_B", "option_C", "option_D")
            options = {k[-1]: str(e[k]).strip() for k in keys if isinstance(e, dict) and str(e.get(k) or "").strip()}
            gt = _field(e, "gt_answer", ann, i)
            letter = [k for k, v in options.items() if v == gt]
            if len(letter) != 1:
                raise DatasetError(f"{ann}: entry {i}: gt_answer {gt!r} is not exactly one of the options")
            img = inside(root, _field(e, "image_path", ann, i), ann)
            items.append(
                Item(
                    id=str(e.get("question_id", f"{ann.stem}:{i}")),
                    task="mcq",
                    inputs=[Source(str(img.relative_to(root)))],
                    prompt=mcq_prompt(_field(e, "question", ann, i), options),
                    reference=letter[0],
                    options=options,
                    group=str(e.get("modality_type") or "") or None,
                )
            )
    if not items:
        raise DatasetError(f"{qa}: the question files hold no question")
    return Dataset("omnimedvqa", root, items, files)


MIMIC_LAYOUT = (
    "MIMIC-CXR-JPG: mimic-cxr-2.0.0-split.csv[.gz] and files/pXX/pSUBJECT/sSTUDY/*.jpg with sSTUDY.txt reports"
)
_SECTION = re.compile(r"^\s*([A-Z][A-Z /]+):", re.M)


def report_reference(text: str) -> str:
    """The FINDINGS section of a MIMIC-CXR free-text report, else IMPRESSION, else the whole text (as
    R2Gen's preprocessing; whitespace collapsed)."""
    parts = _SECTION.split(text)
    sections = {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    for name in ("FINDINGS", "IMPRESSION"):
        if sections.get(name, "").strip():
            return " ".join(sections[name].split())
    return " ".join(text.split())


def read_mimic_cxr(root: Path) -> Dataset:
    """MIMIC-CXR report generation, test split of ``mimic-cxr-2.0.0-split.csv[.gz]`` (``dicom_id``,
    ``study_id``, ``subject_id``, ``split``); images ``files/p<first 2 digits>/p<subject>/s<study>/<dicom_id>.jpg``,
    report ``files/.../p<subject>/s<study>.txt`` (mimic-cxr-reports, same tree). One item per study."""
    candidates = (root / "mimic-cxr-2.0.0-split.csv", root / "mimic-cxr-2.0.0-split.csv.gz")
    split = next((p for p in candidates if p.is_file()), None)
    if split is None:
        raise DatasetError(f"{root}: no mimic-cxr-2.0.0-split.csv[.gz]; expected {MIMIC_LAYOUT}")
    opener = gzip.open if split.suffix == ".gz" else open
    try:
        with opener(split, "rt", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{split}: not a readable CSV ({exc})") from exc
    need = {"dicom_id", "study_id", "subject_id", "split"}
    if not rows or not need <= set(rows[0]):
        raise DatasetError(f"{split}: expected the columns {sorted(need)}")
    studies: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["split"].strip() == "test":
            studies.setdefault((r["subject_id"].strip(), r["study_id"].strip()), []).append(r["dicom_id"].strip())
    if not studies:
        raise DatasetError(f"{split}: no row with split 'test'")
    files = root / "files"
    items, reports = [], []
    for (subject, study), dicoms in sorted(studies.items()):
        folder = files / f"p{subject[:2]}" / f"p{subject}"
        report = _need(folder / f"s{study}.txt", MIMIC_LAYOUT)
        reports.append(report)
        text = report.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DatasetError(f"{report}: empty report")
        imgs = [inside(folder / f"s{study}", f"{d}.jpg", split) for d in sorted(dicoms)]
        items.append(
            Item(
                id=f"s{study}",
                task="report",
                inputs=[Source(str(p.relative_to(root))) for p in imgs],
                prompt=REPORT_INSTRUCTION,
                reference=[report_reference(text)],
            )
        )
    return Dataset("mimic-cxr", root, items, [split, *reports])
