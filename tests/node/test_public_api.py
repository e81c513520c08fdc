"""The listener uses pynetdicom through its public API and changes nothing global on import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# Documented configuration module (pynetdicom docs: "Configuration Options").
ALLOWED_PRIVATE = {"pynetdicom._config"}


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pynetdicom"):
            mod = node.module
            if any(part.startswith("_") for part in mod.split(".")) and mod not in ALLOWED_PRIVATE:
                found.append(f"{path.name}: from {mod}")
            for alias in node.names:
                if alias.name.startswith("_") and f"{mod}.{alias.name}" not in ALLOWED_PRIVATE:
                    found.append(f"{path.name}: {mod}.{alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            # Private attributes of pynetdicom objects (assoc._rejected_cx, ae._servers, dul._run_loop_delay).
            if node.attr in {
                "_rejected_cx",
                "_accepted_cx",
                "_servers",
                "_is_connected",
                "_run_loop_delay",
                "_handlers",
            }:
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return found


def test_no_private_pynetdicom_names_in_the_node() -> None:
    uses = [u for p in sorted((REPO / "dicom_node").rglob("*.py")) for u in _private_uses(p)]
    assert uses == []


def test_importing_the_listener_changes_nothing_global() -> None:
    code = """
import time, pydicom.config as pc
import pynetdicom, pynetdicom._config as cfg, pynetdicom.association as pa, pynetdicom.acse as acse
before = (cfg.LOG_HANDLER_LEVEL, cfg.STORE_RECV_CHUNKED_DATASET, cfg.UNRESTRICTED_STORAGE_SERVICE,
          pc.settings.reading_validation_mode, pa.time is time, acse.ACSE._negotiate_as_acceptor)
import dicom_node.scp, dicom_node.node, dicom_node.ingest, dicom_node.transport_guard
after = (cfg.LOG_HANDLER_LEVEL, cfg.STORE_RECV_CHUNKED_DATASET, cfg.UNRESTRICTED_STORAGE_SERVICE,
         pc.settings.reading_validation_mode, pa.time is time, acse.ACSE._negotiate_as_acceptor)
assert before == after, (before, after)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
