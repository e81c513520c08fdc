"""`unimedvl demo` says which of its outputs no configured rule asks for (custom [[rules]]
replace the shipped ones, demo rules included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dicom_node.config import load_config
from dicom_node.demo import unrequested_outputs
from tests.conftest import REPO, free_port

CUSTOM = """
[node]
host = "127.0.0.1"
port = {port}
[http]
bind = "127.0.0.1:{http}"
[[rules]]
name = "chest"
match = {{ Modality = "CR" }}
[[rules.tasks]]
kind = "report"
"""


def test_shipped_rules_ask_for_everything(tmp_path: Path) -> None:
    cfg = tmp_path / "unimedvl.toml"
    cfg.write_text(f"[node]\nport = {free_port()}\n")
    assert unrequested_outputs(load_config(cfg)) == []


def test_custom_rules_make_the_demo_name_what_it_will_not_produce(tmp_path: Path) -> None:
    cfg = tmp_path / "unimedvl.toml"
    cfg.write_text(CUSTOM.format(port=free_port(), http=free_port()))
    assert unrequested_outputs(load_config(cfg)) == [
        "vqa on the demo CR",
        "synthesize on the demo CR",
        "report on the demo CT",
        "segment on the demo CT",
    ]
    # The CLI says so before sending (nothing listens here, so it then fails to connect).
    run = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "demo", "--config", str(cfg), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"},
    )
    assert "no routing rule asks for: vqa on the demo CR; synthesize on the demo CR" in run.stdout, run.stdout
    assert "segment on the demo CT" in run.stdout and "replace the shipped ones" in run.stdout
