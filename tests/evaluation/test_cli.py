"""`unimedvl eval` through the Typer app: run, print the table beside the published figure, re-score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.eval_datasets import make_dataset


def _unimedvl(*args: str):
    from dicom_node.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.mark.slow
def test_eval_then_score(tmp_path: Path) -> None:
    data = make_dataset("vqa-rad", tmp_path / "VQA_RAD", n=2, size=32)
    out = tmp_path / "out"
    run = _unimedvl("eval", "vqa-rad", str(data), "--out", str(out), "--model", "tiny", "--max-new-tokens", "3")
    assert run.exit_code == 0, run.output
    assert "closed_accuracy (%)" in run.output and "61.9" in run.output and "tiny-0" in run.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["parts"] == "understanding"  # VQA needs no generation weights

    score = _unimedvl("eval", "score", str(out / "predictions.jsonl"), "--out", str(tmp_path / "rescored"))
    assert score.exit_code == 0, score.output
    again = json.loads((tmp_path / "rescored" / "summary.json").read_text())
    summary.pop("timing")
    assert again == summary


def test_wrong_layout_exits_2_naming_the_file(tmp_path: Path) -> None:
    data = make_dataset("slake", tmp_path / "Slake1.0", n=1, size=16)
    (data / "test.json").unlink()
    run = _unimedvl("eval", "slake", str(data), "--out", str(tmp_path / "o"))
    assert run.exit_code == 2
    assert f"{data / 'test.json'} is missing: expected the SLAKE 1.0 release" in run.output
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded


def test_bad_predictions_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "predictions.jsonl"
    bad.write_text("{oops\n")
    run = _unimedvl("eval", "score", str(bad))
    assert run.exit_code == 2 and f"{bad}:1: not JSON" in run.output
