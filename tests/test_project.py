"""Project-wide checks: lint, the dependency rules of docs/ARCHITECTURE.md, console script."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.import_graph import violations


def test_ruff_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_graph_follows_the_dependency_rules() -> None:
    assert violations(REPO) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for pkg in ("dicom_node", "inference", "inference/engine", "sr_writers"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


# Each kind of forbidden import, at module level and hidden in a function (the old
# inference/worker.py did `from dicom_node.db import make_engine` inside a method).
BAD = {
    "worker-lazy-from": (
        "inference/worker.py",
        "class W:\n    def f(self):\n        from dicom_node.db import make_engine\n",
    ),
    "module-import": ("inference/tasks.py", "import dicom_node.jobs.runner as runner\n"),
    "from-package-import-module": ("sr_writers/x.py", "def f():\n    from dicom_node import storage\n"),
    "dynamic": (
        "sr_writers/y.py",
        "import importlib\n\ndef f():\n    return importlib.import_module('dicom_node.db')\n",
    ),
    "engine-pydicom": ("inference/engine/z.py", "def f():\n    import pydicom\n"),
    "engine-celery": ("inference/engine/w.py", "from celery import Celery\n"),
    "engine-sibling": ("inference/engine/v.py", "from inference.preprocess import to_model_image\n"),
    "engine-relative-up": ("inference/engine/u.py", "from ..pipelines import run_task\n"),
    "demo-benchmarks": ("dicom_node/demo.py", "def run():\n    from benchmarks.synthetic import make_cr\n"),
    "cli-module-level-bench": ("dicom_node/cli.py", "from benchmarks.ingest import main\n"),
    "sr-writers-inference": ("sr_writers/seg.py", "from inference.preprocess import modality_lut\n"),
    "inference-benchmarks": ("inference/parity.py", "import benchmarks\n"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_import_graph_catches_each_kind_of_breach(tmp_path: Path, case: str) -> None:
    rel, text = BAD[case]
    found = violations(_tree(tmp_path, {rel: text}))
    assert len(found) >= 1 and all(f.startswith(rel + ":") for f in found), found


def test_import_graph_allows_what_the_rules_allow(tmp_path: Path) -> None:
    ok = {
        "dicom_node/cli.py": "def bench():\n    from benchmarks.ingest import main\n    return main\n",
        "dicom_node/jobs/context.py": "from inference.pipelines import run_task\nimport sr_writers\n",
        "inference/engine/a.py": "import json\nimport torch\nfrom safetensors.torch import load_file\n"
        "from . import b\nfrom .b import c\nfrom PIL import Image\nfrom tokenizers import Tokenizer\n",
        "inference/engine/b.py": "import numpy as np\n\ndef f():\n    import flash_attn\n",
        "inference/pipelines/report.py": "import pydicom\nfrom sr_writers import report_sr\nfrom ..engine import api\n",
        "sr_writers/seg.py": "import highdicom\nfrom .common import x\n",
    }
    assert violations(_tree(tmp_path, ok)) == []


def test_bench_without_the_benchmarks_says_where_to_get_them() -> None:
    script = "import sys; sys.modules['benchmarks'] = None; from dicom_node.cli import app; app()"
    r = subprocess.run([sys.executable, "-c", script, "bench", "ingest"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "come with the source repository" in r.stderr


def test_console_script_lists_commands() -> None:
    # The installed `unimedvl` entry point, loaded by this interpreter (no `.venv/bin` path).
    script = "from importlib.metadata import entry_points; entry_points(group='console_scripts')['unimedvl'].load()()"
    r = subprocess.run(
        [sys.executable, "-c", script, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "bench" in r.stdout
