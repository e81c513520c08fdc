"""A study the console tests look at, built through the real paths: instances ingested as a
C-STORE would, completion, routing, the tiny model running a segmentation (SEG delivered by the
real exporter to a DCMTK storescp) and a CR whose pixels cannot be decoded (its job fails with a
readable reason)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from tests.jobs.conftest import complete_all, ct_study, ingest, undecodable_cr, write_config

RULES: list[dict[str, Any]] = [
    {
        "name": "ct-lesion",
        "match": {"Modality": "CT"},
        "tasks": [{"kind": "segment", "slices": "middle", "steps": 2, "targets": [{"label": "lesion"}]}],
    },
    {"name": "cr-report", "match": {"Modality": "CR"}, "tasks": [{"kind": "report", "max_new_tokens": 4}]},
]


@dataclass
class Scenario:
    config: Path
    settings: Any
    study_uid: str
    failed_job: int
    seg_job: int


def _toml_rules(rules: list[dict[str, Any]]) -> str:
    # TOML inline tables written from JSON (keys are bare words, values JSON-compatible).
    def val(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(v)

    out = []
    for r in rules:
        out += [
            "[[rules]]",
            f"name = {json.dumps(r['name'])}",
            f"match = {val(r['match'])}",
            f"tasks = {val(r['tasks'])}",
        ]
    return "\n".join(out) + "\n"


def write_console_config(tmp_path: Path, pacs: tuple[str, int], **extra: dict[str, Any]) -> Path:
    cfg = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'index.db'}", f"sqla+sqlite:///{tmp_path / 'broker.db'}", pacs=pacs
    )
    text = cfg.read_text()
    for section, keys in extra.items():
        text = f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()) + text
    cfg.write_text(text + _toml_rules(RULES))
    return cfg


def build(tmp_path: Path, pacs: tuple[str, int], **extra: dict[str, Any]) -> Scenario:
    from dicom_node.config import load_config
    from dicom_node.db import init_db, make_engine
    from dicom_node.export import Exporter
    from dicom_node.jobs import Planner
    from dicom_node.jobs.runner import Output, execute_job
    from dicom_node.routing import parse_rules
    from dicom_node.storage import Storage
    from inference.engine import load_engine
    from inference.pipelines import run_task

    cfg = write_console_config(tmp_path, pacs, **extra)
    settings = load_config(cfg)
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    ct = ct_study(tmp_path / "ct", slices=3)
    study_uid = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    cr = undecodable_cr(tmp_path / "cr")
    ds = dcmread(cr[0])
    ds.StudyInstanceUID = study_uid  # the broken CR belongs to the same study
    ds.save_as(cr[0], enforce_file_format=True)
    ingest(settings, [*ct, *cr])
    complete_all(engine, settings)
    plan = Planner(engine, parse_rules(settings.rules), None).plan_revision(study_uid, 1)
    model = load_engine("tiny")

    def run(job: Any, datasets: list[Any]) -> Any:
        out = run_task(job.kind, datasets, job.params, model)
        return [Output(o.dataset, o.kind, o.source_series_uid) for o in out.objects], out.summary, dict(out.model)

    storage = Storage(settings.storage.path)
    kinds = {}
    for job_id in plan.job_ids:
        execute_job(engine, storage, job_id, run, lambda _job: ["pacs"], worker="test-worker:1")
    from dicom_node.jobs.admin import get_job

    for job_id in plan.job_ids:
        job = get_job(engine, job_id)
        assert job is not None
        kinds[job["kind"]] = job
    Exporter(settings, engine, storage).run_once()
    engine.dispose()
    assert kinds["report"]["state"] == "failed" and kinds["segment"]["state"] == "done", kinds
    return Scenario(cfg, settings, study_uid, kinds["report"]["id"], kinds["segment"]["id"])
