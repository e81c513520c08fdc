"""What every pipeline shares: parameters, outputs, errors, provenance, series grouping.

A pipeline turns the instances of one matched series (or several) plus a task's parameters
into DICOM objects ready to store and send. It never touches the database, the broker or the
network: the job layer hands in datasets and an engine, and gets back datasets and a summary.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydicom import Dataset

from inference.preprocess import ModelImage, PreprocessError, decode_frames, series_to_images, sort_slices
from sr_writers import Code, Provenance

from .errors import PipelineError

log = logging.getLogger(__name__)

TASK_KINDS = ("report", "vqa", "segment", "translate", "super_resolve", "synthesize")
# Output object kinds, as the job layer records them.
OBJECT_KINDS = ("sr", "seg", "tid1500", "sc", "derived")

Progress = Callable[[int, int], None]


class Answer(Protocol):
    text: str


class Engine(Protocol):
    """The slice of `inference.engine`'s interface the pipelines use."""

    info: Mapping[str, Any]

    def answer(self, images: list, question: str, **kwargs: Any) -> Answer: ...

    def report(self, images: list, instruction: str | None = None, **kwargs: Any) -> Answer: ...

    def generate_image(self, prompt: str, **kwargs: Any) -> np.ndarray: ...

    def edit_image(self, image: Any, instruction: str, **kwargs: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class OutputObject:
    dataset: Dataset
    kind: str  # one of OBJECT_KINDS
    source_series_uid: str | None  # the analysed series (None for study-level outputs)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


@dataclass
class PipelineOutput:
    """The objects a task produced, in the order they should be stored and sent."""

    task: str
    objects: list[OutputObject] = field(default_factory=list)
    summary: str = ""
    notes: list[str] = field(default_factory=list)
    # JSON-serialisable model results for the job record / UI (report text, answers, segment areas ...)
    results: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def datasets(self) -> list[Dataset]:
        return [o.dataset for o in self.objects]

    def add(self, dataset: Dataset, kind: str, source_series_uid: str | None) -> None:
        if kind not in OBJECT_KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        self.objects.append(OutputObject(dataset, kind, source_series_uid))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Target:
    label: str
    category: Code
    property_type: Code
    instruction: str
    threshold: int


@dataclass(frozen=True)
class TaskParams:
    """The routing rule's task parameters (TaskSpec.parameters(), a JSON dict), checked and typed."""

    kind: str
    prompt: str | None = None
    questions: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()
    slices: str | int = "key:3"
    window: str | tuple[float, float] | None = None
    max_new_tokens: int = 512
    steps: int = 50
    seed: int = 0
    size: tuple[int, int] | None = None
    labelmap: bool = False
    think: bool = False
    describe_first: bool = False
    max_think_tokens: int | None = None  # None: the engine's reference bounds (1000 plan, 800 description)
    temperature: float = 0.0
    top_p: float = 1.0
    guidance: tuple[tuple[str, Any], ...] = ()  # sampler overrides (cfg_*, timestep_shift), set ones only

    def text_options(self) -> dict[str, Any]:
        """Keyword arguments of ``engine.answer``/``report`` from the rule (sampling, think)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "think": self.think}

    def image_options(self) -> dict[str, Any]:
        """Keyword arguments of ``engine.generate_image``/``edit_image`` from the rule (think, guidance...)."""
        opts: dict[str, Any] = {"think": self.think, **dict(self.guidance)}
        if self.describe_first:
            opts["describe_first"] = True
        if self.max_think_tokens is not None:
            opts["max_think_tokens"] = self.max_think_tokens
            if self.describe_first:
                opts["max_describe_tokens"] = self.max_think_tokens
        return opts


GUIDANCE_KEYS = (
    "cfg_text_scale",
    "cfg_img_scale",
    "cfg_interval",
    "timestep_shift",
    "cfg_renorm_type",
    "cfg_renorm_min",
)


def _engine_options(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """think / describe_first / temperature / top_p / guidance overrides, checked (routing.TaskSpec fields)."""
    out: dict[str, Any] = {}
    for key in ("think", "describe_first"):
        value = params.get(key, False)
        if not isinstance(value, bool):
            raise PipelineError(f"parameter {key} must be true or false, got {value!r}")
        out[key] = value
    if out["describe_first"] and kind not in ("translate", "super_resolve", "segment"):
        raise PipelineError(f"describe_first applies to translate, super_resolve and segment tasks, not {kind}")
    for key, default, ok in (("temperature", 0.0, lambda v: v >= 0), ("top_p", 1.0, lambda v: 0 < v <= 1)):
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
            raise PipelineError(f"parameter {key}={value!r} is out of range")
        out[key] = float(value)
    guidance = []
    for key in GUIDANCE_KEYS:
        value = params.get(key)
        if value is None:
            continue
        if key == "cfg_interval":
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise PipelineError(f"cfg_interval must be [low, high], got {value!r}")
            value = (float(value[0]), float(value[1]))
        elif key != "cfg_renorm_type" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise PipelineError(f"parameter {key} must be a number, got {value!r}")
        guidance.append((key, value))  # ranges are checked by the engine (a ValueError -> PipelineError)
    out["guidance"] = tuple(guidance)
    out["max_think_tokens"] = _int(params, "max_think_tokens", None, 2, 8192)
    return out


_DEFAULT_CATEGORY = {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"}
_DEFAULT_TYPE = {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}


def _code(spec: Any, default: Mapping[str, str], what: str) -> Code:
    spec = spec or default
    if not isinstance(spec, Mapping):
        raise PipelineError(f"{what} must be an object with scheme, value and meaning")
    try:
        return Code(str(spec["value"]), str(spec.get("scheme", "SCT")), str(spec["meaning"]))
    except (KeyError, ValueError) as exc:
        raise PipelineError(f"invalid {what}: {exc}") from None


def _int(params: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise PipelineError(f"parameter {key} must be an integer, got {value!r}")
    if not lo <= int(value) <= hi:
        raise PipelineError(f"parameter {key}={value} is outside {lo}..{hi}")
    return int(value)


def parse_params(kind: str, params: Mapping[str, Any]) -> TaskParams:
    """Typed parameters; a missing or malformed value a task needs is a PipelineError."""
    if kind not in TASK_KINDS:
        raise PipelineError(f"unknown task kind {kind!r}; known: {', '.join(TASK_KINDS)}")
    if params.get("kind") not in (None, kind):
        raise PipelineError(f"task kind {kind!r} does not match the parameters' kind {params.get('kind')!r}")
    window = params.get("window")
    if isinstance(window, list | tuple):  # JSON turns the (center, width) tuple into a list
        if len(window) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in window):
            raise PipelineError(f"window must be a preset name or [center, width], got {window!r}")
        window = (float(window[0]), float(window[1]))
    elif window is not None and not isinstance(window, str):
        raise PipelineError(f"window must be a preset name or [center, width], got {window!r}")
    size = params.get("size")
    if size is not None:
        if not isinstance(size, list | tuple) or len(size) != 2 or not all(isinstance(v, int) for v in size):
            raise PipelineError(f"size must be [rows, columns], got {size!r}")
        if not all(16 <= v <= 4096 for v in size):
            raise PipelineError(f"size {list(size)} is outside 16..4096 pixels per side")
        size = (int(size[0]), int(size[1]))
    prompt = params.get("prompt")
    prompt = str(prompt).strip() if prompt is not None and str(prompt).strip() else None
    questions = tuple(str(q).strip() for q in params.get("questions") or () if str(q).strip())
    targets = []
    for i, t in enumerate(params.get("targets") or ()):
        if not isinstance(t, Mapping) or not str(t.get("label", "")).strip():
            raise PipelineError(f"segment target {i + 1} needs a label")
        label = str(t["label"]).strip()
        threshold = _int(t, "threshold", 128, 1, 255)
        targets.append(
            Target(
                label=label,
                category=_code(t.get("category"), _DEFAULT_CATEGORY, f"category of target {label!r}"),
                property_type=_code(t.get("type"), _DEFAULT_TYPE, f"type of target {label!r}"),
                instruction=str(t.get("instruction") or "").strip() or f"Segment the {label}.",
                threshold=threshold,
            )
        )
    slices = params.get("slices", "key:3")
    if isinstance(slices, bool) or not isinstance(slices, str | int):
        raise PipelineError(f"slices must be all, middle, key:N, every:K or a number, got {slices!r}")
    out = TaskParams(
        kind=kind,
        prompt=prompt,
        questions=questions,
        targets=tuple(targets),
        slices=slices,
        window=window,
        max_new_tokens=_int(params, "max_new_tokens", 512, 1, 8192),
        steps=_int(params, "steps", 50, 1, 1000),
        seed=_int(params, "seed", 0, 0, 2**63 - 1),
        size=size,
        labelmap=bool(params.get("labelmap", False)),
        **_engine_options(kind, params),
    )
    if kind == "vqa" and not out.questions:
        raise PipelineError("a vqa task needs at least one question")
    if kind == "segment" and not out.targets:
        raise PipelineError("a segment task needs at least one target")
    if kind == "segment" and len({t.label for t in out.targets}) != len(out.targets):
        raise PipelineError("segment target labels must be unique")
    if kind in ("translate", "super_resolve", "synthesize") and not out.prompt:
        raise PipelineError(f"a {kind} task needs a prompt")
    return out


# --------------------------------------------------------------------------- provenance


def provenance_from_engine(info: Mapping[str, Any], **overrides: Any) -> Provenance:
    """Provenance (model name, version, checkpoint hash, demo flag) from ``engine.info``.

    ``overrides`` are Provenance fields the site configures (institution_name, uid_root, ...)."""
    fields: dict[str, Any] = {
        "model_name": str(info.get("model_name") or "UniMedVL"),
        "model_version": str(info.get("version") or info.get("model_version") or "unknown"),
        "checkpoint_hash": str(info.get("checkpoint_sha256") or info.get("checkpoint_hash") or ""),
        "is_demo": bool(info.get("is_demo", False)),
    }
    fields.update(overrides)
    return Provenance(**fields)


# --------------------------------------------------------------------------- sources


@dataclass
class SeriesInput:
    series_instance_uid: str
    datasets: list[Dataset]  # image instances, sorted along the slice normal (or InstanceNumber)


def series_label(series: SeriesInput) -> str:
    """'series 3 "Axial T2"' (SeriesNumber and SeriesDescription of its first instance), for failure
    reasons: an operator finds the series in the viewer by these, without a UID."""
    first = series.datasets[0] if series.datasets else Dataset()
    number = first.get("SeriesNumber")
    description = " ".join(str(first.get("SeriesDescription", "") or "").split())
    label = f"series {number}" if number not in (None, "") else "series (no SeriesNumber)"
    return f'{label} "{description}"' if description else f"{label} (no description)"


def _has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def group_series(datasets: Sequence[Dataset], out: PipelineOutput) -> list[SeriesInput]:
    """Group instances by series (order of first appearance); all must belong to one study."""
    if not datasets:
        raise PipelineError("no instances were given to the task")
    studies = {str(d.get("StudyInstanceUID", "")) for d in datasets}
    if len(studies) != 1 or "" in studies:
        raise PipelineError(f"the instances must belong to exactly one study (found {len(studies - {''})})")
    groups: dict[str, list[Dataset]] = {}
    for d in datasets:
        uid = str(d.get("SeriesInstanceUID", ""))
        if not uid:
            raise PipelineError("an instance has no SeriesInstanceUID")
        groups.setdefault(uid, []).append(d)
    series = []
    for uid, items in groups.items():
        images = [d for d in items if _has_pixels(d)]
        if len(images) < len(items):
            out.note(f"{len(items) - len(images)} instance(s) without pixel data were left out")
        if not images:
            raise PipelineError("a matched series holds no images with pixel data")
        seen: dict[str, Dataset] = {}
        for d in images:  # the same instance received twice is analysed once
            seen.setdefault(str(d.SOPInstanceUID), d)
        series.append(SeriesInput(uid, sort_slices(list(seen.values()))))
    return series


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Model text as it may go into a UT/LT element: no control characters or decoding debris."""
    text = _CONTROL.sub("", str(text)).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def as_rgb8(image: Any, what: str) -> np.ndarray:
    """An engine image output checked to be H x W x 3 (or H x W) uint8; returned as H x W x 3."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, np.newaxis], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 1:
        raise PipelineError(f"the engine returned a {what} of shape {arr.shape}, expected height x width x 3")
    if arr.dtype != np.uint8:
        raise PipelineError(f"the engine returned a {what} of type {arr.dtype}, expected uint8")
    return np.ascontiguousarray(arr[:, :, :3])


def report_progress(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def prepare_images(series: SeriesInput, params: TaskParams, out: PipelineOutput) -> list[ModelImage]:
    """The selected slices of a series as model images; notes (downscaling) go into ``out``.

    A decoding failure names the instance by its position in the series and InstanceNumber (no
    UIDs: the reason ends up in logs and the UI)."""
    try:
        images = series_to_images(series.datasets, window=params.window, slices=params.slices)
    except PreprocessError as exc:
        where = _failing_instance(series.datasets)
        raise PipelineError(f"preprocessing: cannot prepare the images{where}: {exc}") from exc
    if not images:
        raise PipelineError("the slice selection picked no images from the series")
    for img in images:
        for note in img.notes:
            out.note(note)
    return images


def _failing_instance(datasets: Sequence[Dataset]) -> str:
    for i, ds in enumerate(datasets, start=1):
        try:
            decode_frames(ds)
        except PreprocessError:
            number = ds.get("InstanceNumber")
            return f" (instance {i} of {len(datasets)} in slice order, InstanceNumber {number})"
    return ""
