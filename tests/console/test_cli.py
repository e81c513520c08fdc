"""The display commands: `studies` (with the StudyInstanceUID), `timeline` (tree or --json),
`status` (wrapping, failures and "matched no rule" naming their study)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app


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


@pytest.mark.dcmtk
@pytest.mark.slow
def test_studies_shows_the_study_instance_uid(scenario: Any) -> None:
    out = _run("studies", "--config", str(scenario.config), columns=200)
    assert scenario.study_uid in out


@pytest.mark.dcmtk
@pytest.mark.slow
def test_timeline_tree_and_json(scenario: Any) -> None:
    _failed_again(scenario)
    cfg = str(scenario.config)
    tree = _run("timeline", scenario.study_uid, "--config", cfg, columns=160)
    assert tree.splitlines()[0] == f"study {scenario.study_uid}"
    assert re.search(rf"job {scenario.failed_job} report \(rule cr-report\): failed", tree)
    unwrapped = re.sub(r"\s*\n[\s│]*", " ", tree)  # the tree wraps long reasons under their branch
    assert "reason: " in tree and "cannot decode pixel data" in unwrapped
    assert re.search(r"-> pacs: done \(1 attempt\(s\)\)", tree)
    data = json.loads(_run("timeline", scenario.study_uid, "--config", cfg, "--json"))
    jobs = {j["id"]: j for r in data["revisions"] for j in r["jobs"]}
    assert jobs[scenario.failed_job]["state"] == "failed" and jobs[scenario.seg_job]["deliveries"]


@pytest.mark.dcmtk
@pytest.mark.slow
@pytest.mark.parametrize("columns", [60, 100, 200])
def test_status_wraps_instead_of_truncating_and_names_studies(scenario: Any, columns: int) -> None:
    _failed_again(scenario)
    out = _run("status", "--config", str(scenario.config), columns=columns)
    assert "…" not in out  # nothing cut off, whatever the terminal width
    assert max(len(line) for line in out.splitlines()) <= columns
    flat = re.sub(r"\s+", "", out)  # wrapped lines joined: the whole UID and message are there
    assert f"ofstudy{scenario.study_uid}failed" in flat
    assert "cannotdecodepixeldata" in flat


def test_users_commands(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from dicom_node.config import load_config
    from tests.console.conftest import make_app

    cfg = tmp_path / "unimedvl.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "index.db"}"\n[storage]\npath = "{tmp_path / "s"}"\n')
    runner = CliRunner()

    def users(*args: str, stdin: str | None = None) -> Any:
        return runner.invoke(app, ["users", *args, "--config", str(cfg)], input=stdin)

    assert users("add", "carol", "--role", "admin", "--password-stdin", stdin="carol-password-1\n").exit_code == 0
    again = users("add", "carol", "--password-stdin", stdin="another-password\n")
    assert again.exit_code == 2 and "exists already" in again.output
    short = users("add", "dave", "--password-stdin", stdin="short\n")
    assert short.exit_code == 2 and "at least 10 characters" in short.output
    bad_role = users("add", "erin", "--role", "root", "--password-stdin", stdin="erin-password-1\n")
    assert bad_role.exit_code == 2 and "role must be one of" in bad_role.output
    assert users("list").output.split() == ["carol", "admin"]
    # The token is the one word printed with the token prefix (other lines may share the output).
    token = next(w for w in users("token", "carol", "--label", "ci").output.split() if w.startswith("umv_"))
    client = TestClient(make_app(load_config(cfg)))
    assert client.get("/api/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert users("remove", "carol").exit_code == 0
    assert client.get("/api/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert users("token", "nobody").exit_code == 2
