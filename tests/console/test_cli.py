"""The display commands: `studies` (with the StudyInstanceUID), `timeline` (tree or --json),
`status` (wrapping, failures and "matched no rule" naming their study)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def _run(*args: str, columns: int = 100) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def _failed_again(scenario: Any) -> None:
    """The browser test may have re-queued the failed job: fail it again the way a worker does."""
    from dicom_node.db import make_engine
    from dicom_node.jobs.admin import get_job
    from dicom_node.jobs.runner import claim, fail

    engine = make_engine(scenario.settings.database.url)
    job = get_job(engine, scenario.failed_job)
    if job is not None and job["state"] != "failed":
        c = claim(engine, scenario.failed_job, "test-worker:2")
        assert c is not None and fail(engine, c, "preprocessing: cannot decode pixel data (again)")
    engine.dispose()


def test_studies_shows_the_study_instance_uid(scenario: Any) -> None:
    out = _run("studies", "--config", str(scenario.config), columns=200)
    assert scenario.study_uid in out


def test_timeline_tree_and_json(scenario: Any) -> None:
    _failed_again(scenario)
    cfg = str(scenario.config)
    tree = _run("timeline", scenario.study_uid, "--config", cfg, columns=160)
    assert tree.splitlines()[0] == f"study {scenario.study_uid}"
    assert re.search(rf"job {scenario.failed_job} report \(rule cr-report\): failed", tree)
    assert "reason: preprocessing" in tree and "cannot decode pixel data" in tree
    assert re.search(r"-> pacs: done \(1 attempt\(s\)\)", tree)
    data = json.loads(_run("timeline", scenario.study_uid, "--config", cfg, "--json"))
    jobs = {j["id"]: j for r in data["revisions"] for j in r["jobs"]}
    assert jobs[scenario.failed_job]["state"] == "failed" and jobs[scenario.seg_job]["deliveries"]


@pytest.mark.parametrize("columns", [60, 100, 200])
def test_status_wraps_instead_of_truncating_and_names_studies(scenario: Any, columns: int) -> None:
    _failed_again(scenario)
    out = _run("status", "--config", str(scenario.config), columns=columns)
    assert "…" not in out  # nothing cut off, whatever the terminal width
    assert max(len(line) for line in out.splitlines()) <= columns
    flat = re.sub(r"\s+", "", out)  # wrapped lines joined: the whole UID and message are there
    assert f"ofstudy{scenario.study_uid}failed" in flat
    assert "cannotdecodepixeldata" in flat
