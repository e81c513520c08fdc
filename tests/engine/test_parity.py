"""The golden-vector parity runner: every shipped set passes; a tampered output is caught and named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from inference.parity import main as parity_main
from tests.conftest import REPO
from tests.engine.conftest import GOLDEN_ROOT, golden_sets


def _require_sets():
    sets = golden_sets()
    if not sets:
        pytest.fail(f"no golden sets found under {GOLDEN_ROOT} (expected ../shared/golden/<set>/manifest.json)")
    return sets


def test_every_golden_set_passes_via_cli():
    for root in _require_sets():
        proc = subprocess.run(
            [sys.executable, "-m", "inference.parity", str(root)], cwd=REPO, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        manifest = json.loads((root / "manifest.json").read_text())
        for case in manifest["cases"]:  # every case ran and reported its largest error
            assert f"PASS  {case['name']}" in proc.stdout, proc.stdout


def test_tampered_output_fails_and_names_the_case(tmp_path, capsys):
    root = _require_sets()[0]
    copy = tmp_path / root.name
    shutil.copytree(root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    # perturb the first float output of the last case by far more than the tolerance
    case = manifest["cases"][-1]
    name = next(n for n, s in case["tensors"].items() if s["role"] == "output" and s["dtype"] == "float32")
    path = copy / case["file"]
    tensors = load_file(str(path))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.05
    path.chmod(0o644)
    save_file(tensors, str(path))
    rc = parity_main([str(copy)])
    out = capsys.readouterr().out
    assert rc != 0
    assert f"FAIL  {case['name']}" in out
    assert name in out
    # the other cases still ran and passed
    assert sum(line.startswith("PASS") for line in out.splitlines()) == len(manifest["cases"]) - 1


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    rc = parity_main([str(tmp_path)])
    assert rc == 2
    assert "manifest.json" in capsys.readouterr().err
