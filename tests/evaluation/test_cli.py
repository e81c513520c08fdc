"""`unimedvl eval` from the console script: run, print the table beside the published figure, re-score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.eval_datasets import make_dataset
from tests.conftest import REPO


def _unimedvl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip


@pytest.mark.slow
def test_eval_then_score(tmp_path: Path) -> None:
    data = make_dataset("vqa-rad", tmp_path / "VQA_RAD", n=2, size=32)
    out = tmp_path / "out"
    run = _unimedvl("eval", "vqa-rad", str(data), "--out", str(out), "--model", "tiny", "--max-new-tokens", "3",
                    cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "closed_accuracy (%)" in run.stdout and "61.9" in run.stdout and "tiny-0" in run.stdout
    summary = json.loads((out / "summary.json").read_text())

    score = _unimedvl(
        "eval", "score", str(out / "predictions.jsonl"), "--out", str(tmp_path / "rescored"), cwd=tmp_path
    )
    assert score.returncode == 0, score.stderr
    again = json.loads((tmp_path / "rescored" / "summary.json").read_text())
    summary.pop("timing")
    assert again == summary


def test_wrong_layout_exits_2_naming_the_file(tmp_path: Path) -> None:
    data = make_dataset("slake", tmp_path / "Slake1.0", n=1, size=16)
    (data / "test.json").unlink()
    run = _unimedvl("eval", "slake", str(data), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert run.returncode == 2
    assert f"{data / 'test.json'} is missing: expected the SLAKE 1.0 release" in run.stderr
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded
