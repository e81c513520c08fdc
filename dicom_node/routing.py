"""Routing rules: which model tasks run on which series of a completed study.

A rule matches series by DICOM attributes and by the association they came in on, and lists
tasks with their parameters. Every matching rule contributes its tasks (a rule with
`stop = true` ends the search for that series). A series that matches nothing is reported as
such by `plan_study`, so the caller can record it instead of dropping it silently.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TaskKind = Literal["report", "vqa", "segment", "translate", "super_resolve", "synthesize"]
EDIT_TASKS = ("translate", "super_resolve", "segment")  # the tasks that run the engine's edit flow


class CodeSpec(BaseModel):
    """A coded concept (scheme designator, value, meaning), e.g. SCT 52988006 "Lesion"."""

    model_config = ConfigDict(extra="forbid")
    scheme: str = "SCT"
    value: str
    meaning: str


class SegmentTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    category: CodeSpec = CodeSpec(value="49755003", meaning="Morphologically Altered Structure")
    type: CodeSpec = CodeSpec(value="52988006", meaning="Lesion")
    instruction: str | None = None  # default: "Segment the {label}."
    threshold: int = Field(128, ge=1, le=255)


class TaskSpec(BaseModel):
    """One model task with its parameters; unknown keys are refused so typos surface at start-up."""

    model_config = ConfigDict(extra="forbid")
    kind: TaskKind
    enabled: bool = True
    prompt: str | None = None  # report instruction, edit instruction or synthesis prompt
    questions: list[str] = []
    targets: list[SegmentTarget] = []
    slices: str | int = "key:3"  # all | middle | key:N | every:K
    window: str | tuple[float, float] | None = None  # preset name, "dicom", or (center, width)
    destinations: list[str] | None = None  # None: every configured destination
    max_new_tokens: int = Field(512, ge=1, le=8192)
    steps: int = Field(50, ge=2, le=1000)  # the sampler needs at least two timesteps
    seed: int = 0
    size: tuple[int, int] | None = None  # synthesize only
    labelmap: bool = False  # SEG as LABELMAP instead of BINARY
    # Model engine options (README "Model engine"); None: the engine's reference default.
    think: bool = False  # the reference's think mode (system prompt, then a decoded plan/reasoning)
    describe_first: bool = False  # translate/super_resolve/segment: describe the image, then edit with it
    max_think_tokens: int | None = Field(None, ge=2, le=8192)  # plan/description bound (reference 1000/800)
    temperature: float = Field(0.0, ge=0.0, le=10.0)  # report/vqa text: 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    cfg_text_scale: float | None = Field(None, ge=0.0, le=50.0)
    cfg_img_scale: float | None = Field(None, ge=0.0, le=50.0)
    cfg_interval: tuple[float, float] | None = None
    timestep_shift: float | None = Field(None, gt=0.0, le=100.0)
    cfg_renorm_type: Literal["global", "channel", "text_channel"] | None = None
    cfg_renorm_min: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _needs(self) -> TaskSpec:
        if self.describe_first and self.kind not in EDIT_TASKS:
            raise ValueError(f"describe_first applies to {', '.join(EDIT_TASKS)} tasks, not {self.kind}")
        if self.cfg_interval is not None and not 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0:
            raise ValueError(f"cfg_interval must be [low, high] with 0 <= low <= high <= 1, got {self.cfg_interval}")
        if self.kind == "vqa" and not self.questions:
            raise ValueError("a vqa task needs at least one entry in questions")
        if self.kind == "segment" and not self.targets:
            raise ValueError("a segment task needs at least one entry in targets")
        if self.kind in ("translate", "super_resolve", "synthesize") and not self.prompt:
            raise ValueError(f"a {self.kind} task needs a prompt")
        return self

    def parameters(self) -> dict[str, Any]:
        """Canonical parameters (everything but `enabled`), for idempotency keys.

        Engine options are left out while at their defaults, so rules written before they existed keep
        their keys (and their jobs are not planned again).
        """
        dump = self.model_dump(mode="json", exclude={"enabled"})
        return {k: v for k, v in dump.items() if k not in ENGINE_OPTIONS or v != ENGINE_OPTIONS[k]}


_FIELDS = list(TaskSpec.model_fields)
# The model engine options are the TaskSpec fields declared from `think` on, with their defaults.
ENGINE_OPTIONS: dict[str, Any] = {k: TaskSpec.model_fields[k].default for k in _FIELDS[_FIELDS.index("think") :]}


class MatchSpec(BaseModel):
    """All given conditions must hold; list values mean any-of; strings compare case-insensitively."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    modality: list[str] | None = Field(None, alias="Modality")
    body_part: list[str] | None = Field(None, alias="BodyPartExamined")
    series_description: str | None = Field(None, alias="SeriesDescription")  # regex, searched
    sop_class: list[str] | None = Field(None, alias="SOPClassUID")
    calling_ae: list[str] | None = None
    called_ae: list[str] | None = None

    @field_validator("modality", "body_part", "sop_class", "calling_ae", "called_ae", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v!r}: {exc}") from None
        return v


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    match: MatchSpec = MatchSpec()
    tasks: list[TaskSpec] = []
    stop: bool = False


@dataclass(frozen=True)
class SeriesInfo:
    """What routing looks at for one series (from the index, never from pixel data)."""

    series_instance_uid: str
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    sop_classes: tuple[str, ...] = ()
    calling_ae: str = ""
    called_ae: str = ""


@dataclass
class PlannedTask:
    rule: str
    task: TaskSpec
    series: list[str]  # SeriesInstanceUIDs the task runs on

    def idempotency_key(self, study_uid: str, revision: int, model_version: str) -> str:
        """(study revision, task, parameters, model version, series) -> a stable key; re-planning never duplicates."""
        payload = {
            "study": study_uid,
            "revision": revision,
            "task": self.task.kind,
            "params": self.task.parameters(),
            "model": model_version,
            "series": sorted(self.series),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class StudyPlan:
    tasks: list[PlannedTask] = field(default_factory=list)
    unmatched_series: list[str] = field(default_factory=list)


def _any_ci(value: str, options: Iterable[str]) -> bool:
    v = value.strip().upper()
    return any(v == o.strip().upper() for o in options)


def matches(match: MatchSpec, s: SeriesInfo) -> bool:
    if match.modality is not None and not _any_ci(s.modality, match.modality):
        return False
    if match.body_part is not None and not _any_ci(s.body_part, match.body_part):
        return False
    if match.series_description is not None and not re.search(
        match.series_description, s.series_description, flags=re.IGNORECASE
    ):
        return False
    if match.sop_class is not None and not set(match.sop_class) & set(s.sop_classes):
        return False
    if match.calling_ae is not None and not _any_ci(s.calling_ae, match.calling_ae):
        return False
    if match.called_ae is not None and not _any_ci(s.called_ae, match.called_ae):
        return False
    return True


def parse_rules(raw: Sequence[dict[str, Any]] | None) -> list[Rule]:
    """Validate `[[rules]]` tables; None (no rules configured) gives the shipped defaults."""
    if raw is None:
        raw = DEFAULT_RULES
    rules = [Rule.model_validate(r) for r in raw]
    names = [r.name for r in rules]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate rule names: {', '.join(sorted(dupes))}")
    return rules


# Kinds whose output does not depend on any one series: one job for the whole study.
STUDY_LEVEL_KINDS = frozenset({"synthesize"})


def plan_study(rules: Sequence[Rule], series: Sequence[SeriesInfo]) -> StudyPlan:
    """Tasks for a study: one PlannedTask per (rule, task, series); study-level kinds
    (synthesize) get one PlannedTask per (rule, task) with every series it matched.

    The series is the unit of work: a series whose pixels cannot be read fails its own jobs
    only, a retry re-runs only those, and the idempotency key (which includes the series)
    keeps re-planning from duplicating outputs.
    """
    plan = StudyPlan()
    by_key: dict[tuple[str, int, str], PlannedTask] = {}
    for s in series:
        matched = False
        for rule in rules:
            if not matches(rule.match, s):
                continue
            matched = True
            for i, task in enumerate(rule.tasks):
                if not task.enabled:
                    continue
                key = (rule.name, i, "" if task.kind in STUDY_LEVEL_KINDS else s.series_instance_uid)
                if key not in by_key:
                    by_key[key] = PlannedTask(rule=rule.name, task=task, series=[])
                by_key[key].series.append(s.series_instance_uid)
            if rule.stop:
                break
        if not matched:
            plan.unmatched_series.append(s.series_instance_uid)
    plan.tasks = list(by_key.values())
    return plan


# Shipped defaults: chest radiographs get a report and a few VQA questions; CT/MR get a
# key-slice report, with segmentation and translation present but disabled until a site
# turns them on; everything else matches nothing (and is recorded as unmatched).
DEMO_SERIES_PREFIX = "UNIMEDVL DEMO"

DEFAULT_RULES: list[dict[str, Any]] = [
    # Only the synthetic study that `unimedvl demo` sends: every output type, kept short.
    {
        "name": "demo-ct",
        "match": {"SeriesDescription": f"^{DEMO_SERIES_PREFIX}", "Modality": ["CT"]},
        "stop": True,
        "tasks": [
            {"kind": "report", "slices": "key:2", "max_new_tokens": 48},
            {"kind": "segment", "slices": "all", "steps": 4, "targets": [{"label": "lesion"}]},
        ],
    },
    {
        "name": "demo-cr",
        "match": {"SeriesDescription": f"^{DEMO_SERIES_PREFIX}", "Modality": ["CR", "DX"]},
        "stop": True,
        "tasks": [
            {"kind": "report", "max_new_tokens": 48},
            {"kind": "vqa", "max_new_tokens": 16, "questions": ["Is there a nodule?"]},
            {"kind": "synthesize", "prompt": "Chest radiograph, no acute findings.", "steps": 4, "size": [256, 256]},
        ],
    },
    {
        "name": "chest-radiograph",
        "match": {"Modality": ["CR", "DX"]},
        "tasks": [
            {
                "kind": "report",
                "prompt": "Write a radiology report for this chest radiograph with Findings and Impression.",
                "slices": "all",
            },
            {
                "kind": "vqa",
                "slices": "all",
                "questions": [
                    "Is there a pleural effusion?",
                    "Is there a pneumothorax?",
                    "Is the cardiac silhouette enlarged?",
                ],
            },
        ],
    },
    {
        "name": "ct-mr-key-slices",
        "match": {"Modality": ["CT", "MR"]},
        "tasks": [
            {
                "kind": "report",
                "prompt": "Describe the findings on these key slices and give an impression.",
                "slices": "key:3",
            },
            {
                "kind": "segment",
                "enabled": False,
                "slices": "all",
                "targets": [{"label": "lesion"}],
            },
            {
                "kind": "translate",
                "enabled": False,
                "slices": "all",
                "prompt": "Translate this CT slice into the corresponding T2-weighted MR image.",
            },
        ],
    },
]
