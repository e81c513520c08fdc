"""deploy/Dockerfile and deploy/Dockerfile.cuda: hadolint-clean, a numeric non-root user that is the
one the Kubernetes manifests run as, base images pinned by digest, and the project's wheel built
from exactly what the Dockerfiles copy in (the packages the tests import, data files included)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.deploy.conftest import venv_tool, workloads

DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
DIGEST = re.compile(r"^[a-z0-9./_-]+:[\w.-]+@sha256:[0-9a-f]{64}$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last:]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_lints_clean(name: str) -> None:
    proc = subprocess.run([venv_tool("hadolint"), str(REPO / "deploy" / name)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_hadolint_catches_a_root_user(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text((REPO / "deploy" / "Dockerfile").read_text().replace("USER 10001:10001", "USER root"))
    proc = subprocess.run([venv_tool("hadolint"), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3002" in proc.stdout  # "Last USER should not be root"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_the_numeric_user_the_manifests_use(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    users = [rest for word, rest in final_stage(instructions(REPO / "deploy" / name)) if word == "USER"]
    assert users, f"{name}: the final stage has no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0 and int(gid) != 0, users[-1]
    image = "gateway" if name == "Dockerfile" else "worker-cuda"
    pods = [
        w["spec"]["template"]["spec"]
        for overlay in ("production", "demo")
        for w in workloads(rendered[overlay]).values()
        if any(c["image"].split(":")[0].endswith(image) for c in w["spec"]["template"]["spec"]["containers"])
    ]
    assert pods
    for pod in pods:
        sc = pod["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"]) == (int(uid), int(gid))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_digest(name: str) -> None:
    steps = instructions(REPO / "deploy" / name)
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    stages: set[str] = set()
    for word, rest in steps:
        if word != "FROM":
            continue
        image, _, alias = rest.partition(" AS ")
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.strip())
        assert image in stages or DIGEST.match(image), f"{name}: FROM {image} is not pinned by digest"
        if alias:
            stages.add(alias.strip())


def test_the_image_wheel_holds_every_module_and_data_file(tmp_path: Path) -> None:
    """Build the wheel from what the Dockerfiles COPY (no more), as their first stage does."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    for name in DOCKERFILES:
        steps = instructions(REPO / "deploy" / name)
        copied = {
            src for word, rest in steps if word == "COPY" and not rest.startswith("--from") for src in rest.split()[:-1]
        }
        assert copied == packages | {"pyproject.toml", "README.md"}, name
        runs = " ".join(rest for word, rest in steps if word == "RUN")
        assert "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ." in runs
        assert re.search(r"pip install .*/wheels/unimedvl-", runs) or '"${WHEEL}[gpu]"' in runs
    context = tmp_path / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for item in sorted(packages):
        shutil.copytree(REPO / item, context / item, ignore=ignore)
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / item, context / item)
    proc = subprocess.run(
        [
            str(Path(venv_tool("pip"))),
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            ".",
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("unimedvl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", *sorted(packages)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    data = tuple("." + p.split(".")[-1] for p in project["tool"]["setuptools"]["package-data"]["*"])
    wanted = {f for f in tracked if f.endswith((".py", *data)) and "/" in f}
    assert wanted and wanted - names == set()
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "unimedvl = dicom_node.cli:app" in zipfile.ZipFile(wheel).read(entry).decode()
