"""The node uses pynetdicom through its public API (private names only in the one guarded
module, checked against the installed version) and changes nothing global on import."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pynetdicom
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.pynetdicom_internals import ParkedCheckpoint, check_internals
from tests.conftest import REPO

# Documented configuration module (pynetdicom docs: "Configuration Options").
ALLOWED_PRIVATE = {"pynetdicom._config"}
# The one module allowed a private pynetdicom name, guarded by check_internals() (tested below).
GUARDED = "pynetdicom_internals.py"


@functools.cache
def _pynetdicom_private_names() -> frozenset[str]:
    """Every `self._name` / `cls._name` pynetdicom's own source uses (its private attributes)."""
    root = Path(pynetdicom.__file__).parent
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                names.add(node.attr)
    return frozenset(names)


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    private = _pynetdicom_private_names()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pynetdicom"):
            mod = node.module
            if any(part.startswith("_") for part in mod.split(".")) and mod not in ALLOWED_PRIVATE:
                found.append(f"{path.name}: from {mod}")
            for alias in node.names:
                if alias.name.startswith("_") and f"{mod}.{alias.name}" not in ALLOWED_PRIVATE:
                    found.append(f"{path.name}: {mod}.{alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in private:
            # A pynetdicom private attribute on another object (assoc._reactor_checkpoint, ae._servers).
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in private:
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")  # getattr/setattr by name
    return found


def test_no_private_pynetdicom_names_in_the_node() -> None:
    paths = [p for p in sorted((REPO / "dicom_node").rglob("*.py")) if p.name != GUARDED]
    uses = [u for p in paths for u in _private_uses(p)]
    assert uses == []


def test_the_scan_finds_private_names_and_the_guarded_module_has_them() -> None:
    # The scan is not vacuous: the guarded module itself is flagged by it.
    assert _private_uses(REPO / "dicom_node" / GUARDED)
    assert {"_reactor_checkpoint", "_is_paused", "_servers"} <= _pynetdicom_private_names()


def test_installed_pynetdicom_has_the_internals_the_guarded_module_uses() -> None:
    assert check_internals() == []


def test_a_pynetdicom_with_other_internals_is_detected_and_not_parked() -> None:
    class Renamed(Association):  # a future pynetdicom whose reactor pauses differently
        def __init__(self, ae: AE, mode: str) -> None:
            super().__init__(ae, mode)
            del self._reactor_checkpoint

        def send_c_store(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            return None

    problems = check_internals(Renamed)
    assert "Association has no threading.Event _reactor_checkpoint" in problems
    assert any("send_c_store" in p for p in problems)
    assert ParkedCheckpoint.install(object(), ok=False) is None


def test_importing_the_listener_changes_nothing_global() -> None:
    code = """
import time, pydicom.config as pc
import pynetdicom, pynetdicom._config as cfg, pynetdicom.association as pa, pynetdicom.acse as acse
before = (cfg.LOG_HANDLER_LEVEL, cfg.STORE_RECV_CHUNKED_DATASET, cfg.STORE_SEND_CHUNKED_DATASET,
          cfg.UNRESTRICTED_STORAGE_SERVICE, pc.settings.reading_validation_mode, pa.time is time,
          acse.ACSE._negotiate_as_acceptor)
import dicom_node.scp, dicom_node.node, dicom_node.ingest, dicom_node.transport_guard
import dicom_node.export.dimse, dicom_node.export.exporter, dicom_node.pynetdicom_internals
after = (cfg.LOG_HANDLER_LEVEL, cfg.STORE_RECV_CHUNKED_DATASET, cfg.STORE_SEND_CHUNKED_DATASET,
         cfg.UNRESTRICTED_STORAGE_SERVICE, pc.settings.reading_validation_mode, pa.time is time,
         acse.ACSE._negotiate_as_acceptor)
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
