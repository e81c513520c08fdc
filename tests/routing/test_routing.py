"""Routing rules: matching, shipped defaults, validation, idempotency keys."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_node import routing as r
from dicom_node.config import ConfigError, load_config
from tests.conftest import REPO

CR = r.SeriesInfo("1.2.3.1", modality="CR", body_part="CHEST", series_description="PA", calling_ae="XRAY1")
CT = r.SeriesInfo("1.2.3.2", modality="CT", body_part="ABDOMEN", series_description="Portal venous 1.0 mm")
US = r.SeriesInfo("1.2.3.3", modality="US")


def test_shipped_defaults() -> None:
    rules = r.parse_rules(None)
    plan = r.plan_study(rules, [CR, CT, US])
    kinds = sorted((t.rule, t.task.kind) for t in plan.tasks)
    assert kinds == [("chest-radiograph", "report"), ("chest-radiograph", "vqa"), ("ct-mr-key-slices", "report")]
    assert plan.unmatched_series == ["1.2.3.3"]  # recorded, not silently dropped
    demo_ct = r.SeriesInfo("1.2.3.9", modality="CT", series_description="UNIMEDVL DEMO CT")
    demo_cr = r.SeriesInfo("1.2.3.8", modality="CR", series_description="UNIMEDVL DEMO CR")
    kinds = sorted((t.rule, t.task.kind) for t in r.plan_study(rules, [demo_ct, demo_cr]).tasks)
    assert kinds == [  # the demo rules stop the search: no default chest/CT tasks on top
        ("demo-cr", "report"),
        ("demo-cr", "synthesize"),
        ("demo-cr", "vqa"),
        ("demo-ct", "report"),
        ("demo-ct", "segment"),
    ]


def test_match_conditions_and_stop() -> None:
    rules = r.parse_rules(
        [
            {
                "name": "thin-ct",
                "match": {"Modality": "ct", "SeriesDescription": r"\b1\.0 ?mm", "calling_ae": ["PACS", "CT1"]},
                "tasks": [{"kind": "report", "prompt": "x"}],
                "stop": True,
            },
            {"name": "any-ct", "match": {"Modality": ["CT"]}, "tasks": [{"kind": "report", "prompt": "y"}]},
        ]
    )
    from_ct1 = r.SeriesInfo("9", modality="CT", series_description="Portal 1.0 mm", calling_ae="ct1")
    plan = r.plan_study(rules, [from_ct1])
    assert [t.rule for t in plan.tasks] == ["thin-ct"]  # stop=True ends the search
    other_ae = r.SeriesInfo("9", modality="CT", series_description="Portal 1.0 mm", calling_ae="MRI")
    assert [t.rule for t in r.plan_study(rules, [other_ae]).tasks] == ["any-ct"]


def test_each_series_gets_its_own_task_except_study_level_ones() -> None:
    # The series is the unit: one broken series must fail (and be retried) alone.
    rules = r.parse_rules(
        [
            {
                "name": "all-cr",
                "match": {"Modality": "CR"},
                "tasks": [{"kind": "report"}, {"kind": "synthesize", "prompt": "x"}],
            }
        ]
    )
    a = r.SeriesInfo("1", modality="CR")
    b = r.SeriesInfo("2", modality="CR")
    plan = r.plan_study(rules, [a, b])
    assert [(t.task.kind, t.series) for t in plan.tasks] == [
        ("report", ["1"]),
        ("synthesize", ["1", "2"]),
        ("report", ["2"]),
    ]
    keys = [t.idempotency_key("1.2.3", 1, "m") for t in plan.tasks]
    assert len(set(keys)) == 3
    assert keys == [t.idempotency_key("1.2.3", 1, "m") for t in r.plan_study(rules, [a, b]).tasks]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "x", "tasks": [{"kind": "vqa"}]}, "at least one entry in questions"),
        ({"name": "x", "tasks": [{"kind": "segment"}]}, "at least one entry in targets"),
        ({"name": "x", "tasks": [{"kind": "translate"}]}, "needs a prompt"),
        ({"name": "x", "tasks": [{"kind": "paint"}]}, "kind"),
        ({"name": "x", "match": {"SeriesDescription": "("}}, "invalid regular expression"),
        ({"name": "x", "match": {"Modalty": "CT"}}, "Modalty"),
        ({"name": "x", "tasks": [{"kind": "report", "promt": "typo"}]}, "promt"),
    ],
)
def test_invalid_rules_name_the_problem(raw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        r.parse_rules([raw])


def test_duplicate_rule_names_refused() -> None:
    with pytest.raises(ValueError, match="duplicate rule names: a"):
        r.parse_rules([{"name": "a"}, {"name": "a"}])


def test_idempotency_key_is_stable_and_sensitive() -> None:
    rules = r.parse_rules(None)
    t = r.plan_study(rules, [CR]).tasks[0]
    k1 = t.idempotency_key("1.2.3", 1, "unimedvl-tiny")
    assert k1 == r.plan_study(r.parse_rules(None), [CR]).tasks[0].idempotency_key("1.2.3", 1, "unimedvl-tiny")
    assert k1 != t.idempotency_key("1.2.3", 2, "unimedvl-tiny")  # new revision
    assert k1 != t.idempotency_key("1.2.3", 1, "unimedvl-14b")  # new model
    changed = t.task.model_copy(update={"max_new_tokens": 64})
    assert r.PlannedTask(t.rule, changed, t.series).idempotency_key("1.2.3", 1, "unimedvl-tiny") != k1


@pytest.mark.parametrize(
    ("rule_toml", "expected"),
    [
        ('name = "cr-vqa"\n[[rules.tasks]]\nkind = "vqa"', 'rules[0] "cr-vqa": tasks[0]: a vqa task needs at least'),
        ('name = "seg"\n[[rules.tasks]]\nkind = "segment"', 'rules[0] "seg": tasks[0]: a segment task needs'),
        ('name = "t"\n[[rules.tasks]]\nkind = "report"\npromt = "x"', 'rules[0] "t": tasks[0].promt: unknown key'),
        ('name = "m"\nmatch = { Modalty = "CT" }', 'rules[0] "m": match.Modalty: unknown key'),
        ('name = "r"\nmatch = { SeriesDescription = "(" }', 'rules[0] "r": match.SeriesDescription: invalid regular'),
        ("stop = true", "rules[0]: name: required key is missing"),
    ],
)
def test_a_bad_rule_stops_every_command_with_rule_key_and_reason(tmp_path: Path, rule_toml: str, expected: str) -> None:
    cfg = tmp_path / "unimedvl.toml"
    cfg.write_text(f"[[rules]]\n{rule_toml}\n")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(cfg)
    if expected.startswith('rules[0] "cr-vqa"'):  # the CLI: exit 2, no traceback, like other config errors
        run = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert run.returncode == 2 and expected in run.stderr and "Traceback" not in run.stderr, run.stderr
