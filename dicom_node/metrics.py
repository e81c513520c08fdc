"""Prometheus metrics of the node.

Counts that several listener processes produce (instances, bytes, duplicates, rejections) are
read from the index at scrape time, so they are correct whatever the number of processes and
survive restarts. Active associations come from a shared-memory slot per listener process.
The completion latency histogram lives in the process that runs the completion monitor, which
is the one that serves /metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from dicom_node.completion import StudyCompleted
from dicom_node.models import COMPLETE, RECEIVING, DuplicateEvent, Instance, Rejection, StudyRevision

COMPLETION_LATENCY = Histogram(
    "unimedvl_study_completion_latency_seconds",
    "Time from a study revision's last instance to its completion",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
STUDY_RECEIVE_DURATION = Histogram(
    "unimedvl_study_receive_duration_seconds",
    "Time from a study revision's first to its last instance",
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)


def observe_completion(ev: StudyCompleted) -> None:
    COMPLETION_LATENCY.observe(max(ev.latency_seconds, 0.0))
    STUDY_RECEIVE_DURATION.observe(max((ev.last_received_at - ev.first_received_at).total_seconds(), 0.0))


class IndexCollector(Collector):
    """Counters derived from the index at scrape time."""

    def __init__(self, engine: Engine, active_associations: Callable[[], int] | None = None) -> None:
        self.engine = engine
        self.active_associations = active_associations

    def collect(self) -> Iterable[Any]:
        with Session(self.engine) as s:
            n_inst, n_bytes, n_dup = s.execute(
                select(
                    func.count(Instance.id),
                    func.coalesce(func.sum(Instance.size), 0),
                    func.coalesce(func.sum(Instance.duplicate_count), 0),
                )
            ).one()
            n_dup_events = s.execute(
                select(DuplicateEvent.action, func.count(DuplicateEvent.id)).group_by(DuplicateEvent.action)
            ).all()
            rejections = s.execute(
                select(Rejection.stage, Rejection.reason, func.count(Rejection.id)).group_by(
                    Rejection.stage, Rejection.reason
                )
            ).all()
            revisions = s.execute(
                select(StudyRevision.state, func.count(StudyRevision.id)).group_by(StudyRevision.state)
            ).all()
            reasons = s.execute(
                select(StudyRevision.reason, func.count(StudyRevision.id))
                .where(StudyRevision.state == COMPLETE)
                .group_by(StudyRevision.reason)
            ).all()
        yield CounterMetricFamily(
            "unimedvl_instances_received", "Instances stored and indexed (distinct SOP Instance UIDs)", value=n_inst
        )
        yield CounterMetricFamily("unimedvl_bytes_received", "Bytes of the stored instances", value=n_bytes)
        yield CounterMetricFamily(
            "unimedvl_duplicates", "Re-sends of known SOP Instance UIDs (identical or different bytes)", value=n_dup
        )
        dup = CounterMetricFamily(
            "unimedvl_duplicate_conflicts", "Re-sends with different bytes, by action taken", labels=["action"]
        )
        for action, n in n_dup_events:
            dup.add_metric([action], n)
        yield dup
        rej = CounterMetricFamily(
            "unimedvl_rejections", "Refused associations and C-STOREs", labels=["stage", "reason"]
        )
        for stage, reason, n in rejections:
            rej.add_metric([stage, reason], n)
        yield rej
        studies = GaugeMetricFamily("unimedvl_study_revisions", "Study revisions by state", labels=["state"])
        counts = dict(revisions)
        for state in (RECEIVING, COMPLETE):
            studies.add_metric([state], counts.get(state, 0))
        yield studies
        why = CounterMetricFamily(
            "unimedvl_study_completions",
            "Completed study revisions by reason (mpps, count, quiet, force)",
            labels=["reason"],
        )
        for reason, n in reasons:
            why.add_metric([reason or "unknown"], n)
        yield why
        if self.active_associations is not None:
            yield GaugeMetricFamily(
                "unimedvl_active_associations", "Established DICOM associations", value=self.active_associations()
            )


def app_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry for collectors bound to one database engine.

    Engine-bound collectors live in the status API's own registry rather than the process-wide
    REGISTRY (which holds the plain counters and histograms), so an app never scrapes another
    app's database; /metrics renders both.
    """
    registry = CollectorRegistry(auto_describe=True)
    for c in collectors:
        registry.register(c)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text of the process-wide metrics followed by the app's engine-bound ones."""
    return generate_latest(REGISTRY) + generate_latest(registry)
