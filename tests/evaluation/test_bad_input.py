"""Bad dataset folders: a clear error naming the file, before any model time; never a silent zero."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.eval_datasets import make_dataset
from inference.evaluation import BENCHMARKS, DatasetError, RecordError, read_benchmark, rescore_file


def _first(root: Path, pattern: str) -> Path:
    return sorted(root.rglob(pattern))[0]


def _edit_json(path: Path, fn: Callable[[list], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


# (benchmark, how to break its folder, text the error must contain)
BREAKS: list[tuple[str, Callable[[Path], object], str]] = [
    ("vqa-rad", lambda r: (r / "VQA_RAD Dataset Public.json").unlink(), "VQA_RAD Dataset Public.json is missing"),
    ("vqa-rad", lambda r: _first(r, "synpic00001.jpg").unlink(), "image 'synpic00001.jpg' is missing"),
    (
        "vqa-rad",
        lambda r: _edit_json(r / "VQA_RAD Dataset Public.json", lambda d: d[0].update(answer=" ")),
        "entry 0 has an empty 'answer'",
    ),
    (
        "vqa-rad",
        lambda r: _edit_json(r / "VQA_RAD Dataset Public.json", lambda d: d[0].update(image_name="../x.jpg")),
        "points outside",
    ),
    ("vqa-rad", lambda r: (r / "VQA_RAD Dataset Public.json").write_text("{not json"), "not readable JSON"),
    ("slake", lambda r: _edit_json(r / "test.json", lambda d: d.clear()), "non-empty list"),
    ("slake", lambda r: _edit_json(r / "test.json", lambda d: d[0].pop("answer_type")), "has no 'answer_type'"),
    ("pathvqa", lambda r: (r / "qas/test/test_qa.pkl").write_bytes(pickle.dumps([Path("x")])), "refusing to load"),
    ("pathvqa", lambda r: _first(r, "test_0000.jpg").unlink(), "image 'test_0000.jpg' is missing"),
    (
        "omnimedvqa",
        lambda r: _edit_json(_first(r, "Synthetic.json"), lambda d: d[0].update(gt_answer="PET")),
        "gt_answer 'PET' is not exactly one of the options",
    ),
    ("mimic-cxr", lambda r: _first(r, "s5*.txt").write_text(" \n"), "empty report"),
    ("mimic-cxr", lambda r: _first(r, "s5*.txt").unlink(), ".txt is missing"),
    ("mimic-cxr", lambda r: (r / "mimic-cxr-2.0.0-split.csv").unlink(), "no mimic-cxr-2.0.0-split.csv"),
    ("busi", lambda r: _first(r, "*_mask.png").unlink(), "no mask"),
    ("busi", lambda r: (r / "malignant").rename(r / "Malignant-renamed"), "malignant is missing"),
    ("glas", lambda r: _first(r, "*_anno.bmp").unlink(), "no annotation"),
    ("isic2018", lambda r: _first(r, "*_segmentation.png").unlink(), "its mask"),
    ("isic2018", lambda r: (r / "ISIC2018_Task1_Test_GroundTruth").rename(r / "gt"), "no input/ground-truth"),
    ("refuge", lambda r: _first(r, "T0001.bmp").unlink(), "T0001.bmp is missing"),
    ("kvasir-seg", lambda r: _first(r, "masks/cju0.jpg").unlink(), "mask"),
    ("brats", lambda r: _first(r, "*_flair.nii.gz").unlink(), "_flair.nii.gz is missing"),
]


@pytest.mark.parametrize(("name", "breaker", "message"), BREAKS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BREAKS)])
def test_broken_layout_names_the_file(name: str, breaker, message: str, tmp_path: Path) -> None:
    root = make_dataset(name, tmp_path / name, size=16)
    breaker(root)
    with pytest.raises(DatasetError) as err:
        read_benchmark(name, root)
    assert message in str(err.value)
    assert str(tmp_path) in str(err.value) or "points outside" in message


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_empty_folder_says_what_layout_is_expected(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        read_benchmark(name, tmp_path)
    assert str(tmp_path) in str(err.value)


def test_unknown_benchmark_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown benchmark 'vqa'; known: vqa-rad"):
        read_benchmark("vqa", tmp_path)
    with pytest.raises(DatasetError, match="is not a folder"):
        read_benchmark("slake", tmp_path / "nope")


def test_unreadable_mask_fails_the_item_not_the_score(tmp_path: Path) -> None:
    from inference.evaluation.items import load_reference_mask

    root = make_dataset("kvasir-seg", tmp_path / "k", n=1, size=16)
    ds = read_benchmark("kvasir-seg", root)
    (root / "masks" / "cju0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="cju0.jpg: cannot be read"):
        load_reference_mask(root, ds.items[0].reference)


def test_bad_predictions_file_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "predictions.jsonl"
    good = '{"id": "1", "task": "vqa", "answer_type": "open", "prediction": "a", "reference": "a", "error": null}'
    p.write_text(good + "\n{oops\n")
    with pytest.raises(RecordError, match=r"predictions.jsonl:2: not JSON"):
        rescore_file(p)
    p.write_text(
        '{"id": "1", "task": "vqa", "answer_type": "open", "prediction": "a", "reference": "", "error": null}\n'
    )
    with pytest.raises(RecordError, match=r"predictions.jsonl:1 \(item '1'\): cannot be scored \(empty reference"):
        rescore_file(p)


def test_rescoring_without_run_json_groups_mixed_tasks(tmp_path: Path) -> None:
    p = tmp_path / "predictions.jsonl"
    recs = [
        {
            "id": "1",
            "task": "vqa",
            "answer_type": "open",
            "prediction": "left lung",
            "reference": "lung",
            "error": None,
        },
        {"id": "2", "task": "report", "prediction": "lungs clear", "reference": ["the lungs are clear"], "error": None},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = rescore_file(p)["metrics"]
    assert m["vqa"]["open_recall"] == 100.0
    assert m["report"]["rougeL"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # LCS 2: P 2/2, R 2/4
