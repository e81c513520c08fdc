"""inference/evaluation never imports the node (one-way dependencies: dicom_node -> inference)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO


def test_no_dicom_node_import_in_source() -> None:
    offenders = []
    for path in sorted((REPO / "inference" / "evaluation").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "dicom_node"]
    assert offenders == []


def test_importing_every_module_loads_no_dicom_node() -> None:
    code = (
        "import sys, pkgutil, importlib, inference.evaluation as e\n"
        "for m in pkgutil.iter_modules(e.__path__): importlib.import_module(f'inference.evaluation.{m.name}')\n"
        "print(sorted(n for n in sys.modules if n.startswith('dicom_node')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
