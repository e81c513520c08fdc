"""End to end with the tiny model on every benchmark's released layout, and re-scoring equality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.eval_datasets import make_dataset
from inference.evaluation import BENCHMARKS, comparable, read_benchmark, rescore_file, run_benchmark
from inference.evaluation.report import SUMMARY_JSON, SUMMARY_MD

from .conftest import FAST

ITEMS = {"vqa-rad": 3}  # closed yes/no, closed no, open; one image (two items for REFUGE, BraTS) elsewhere


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_end_to_end_and_rescoring(name: str, tmp_path: Path, tiny_engine) -> None:
    data = make_dataset(name, tmp_path / "data", n=ITEMS.get(name, 1), size=32)
    out = tmp_path / "out"
    summary = run_benchmark(name, data, out, tiny_engine, settings=FAST)

    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert records and all(r["error"] is None for r in records), records
    for r in records:
        assert {"id", "prompt", "prediction", "reference", "score"} <= set(r)
    head = summary["headline"]
    assert head["published"] == BENCHMARKS[name].published
    assert head["ours"] is not None and head["difference"] == pytest.approx(head["ours"] - head["published"])
    assert summary["model"]["checkpoint_sha256"] == "tiny-0" and summary["engine_settings"]["steps"] == 2
    assert len(summary["dataset"]["data_sha256"]) == 64 and summary["dataset"]["items"] == len(records)
    assert json.loads((out / SUMMARY_JSON).read_text())["headline"] == head
    md = (out / SUMMARY_MD).read_text()
    assert f"| {head['metric']}" in md and str(BENCHMARKS[name].published) in md

    again = rescore_file(out / "predictions.jsonl")
    assert comparable(again) == comparable(summary)


def test_rescoring_changes_when_a_prediction_is_edited(tmp_path: Path, tiny_engine) -> None:
    """Re-scoring recomputes from the predictions (it does not echo stored scores)."""
    data = make_dataset("vqa-rad", tmp_path / "data", n=2, size=32)
    out = tmp_path / "out"
    run_benchmark("vqa-rad", data, out, tiny_engine, settings=FAST)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for rec in lines:
        rec["prediction"] = rec["reference"]  # a perfect model
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = rescore_file(out / "predictions.jsonl")
    assert summary["metrics"]["closed_accuracy"] == 100.0
    assert summary["headline"]["difference"] == pytest.approx(100.0 - 61.9)


def test_item_the_engine_refuses_is_failed_and_counted_not_scored_zero(tmp_path: Path, tiny_engine) -> None:
    """The real engine refuses an empty prompt (ValueError): that item fails with the reason, the others
    are scored, and the summary counts the failure instead of averaging a zero in."""
    from inference.evaluation.report import build_summary
    from inference.evaluation.runner import Clock, evaluate_items

    data = make_dataset("vqa-rad", tmp_path / "data", n=2, size=32)
    ds = read_benchmark("vqa-rad", data)
    ds.items[0].prompt = "   "
    ds.items = ds.items[:1]
    out = tmp_path / "out"
    out.mkdir()
    records = evaluate_items(tiny_engine, ds, out, FAST, Clock())
    assert records[0]["error"].startswith(("ValueError:", "InputError:")) and "score" not in records[0]
    summary = build_summary({"benchmark": "vqa-rad", "task": "vqa"}, records)
    assert summary["metrics"]["failed"] == 1 and summary["metrics"]["closed_accuracy"] is None
    assert summary["headline"]["ours"] is None and summary["failed_items"][0]["id"] == records[0]["id"]


def test_dataset_hash_pins_the_files(tmp_path: Path) -> None:
    data = make_dataset("kvasir-seg", tmp_path / "k", n=2, size=16)
    before = read_benchmark("kvasir-seg", data).file_hashes()
    (data / "masks" / "cju1.jpg").write_bytes((data / "masks" / "cju0.jpg").read_bytes())
    after = read_benchmark("kvasir-seg", data).file_hashes()
    assert before["data_files"] == after["data_files"] == 4
    assert before["data_sha256"] != after["data_sha256"]
