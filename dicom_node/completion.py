"""Study completion: decide from DB timestamps when a study (revision) has stopped arriving.

- A series is complete when no instance arrived for `series_quiet_seconds`.
- A study revision completes ("quiet") when no instance arrived for `study_quiet_seconds` and
  every series it touched is complete, or ("force") `force_complete_seconds` after its first
  instance even if instances keep trickling in.
- An instance arriving after completion opens revision n+1 (dicom_node.ingest), never merging
  silently into work already dispatched.

All state lives in the DB, so a restarted monitor recomputes every timer from the stored
timestamps. Subscribers (`on_study_complete`) run after the completion commit; a revision is
marked `notified_at` only when all of them returned, so a crash in between re-delivers it on
the next poll (at-least-once: subscribers must be idempotent per (study, revision)).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from dicom_node.config import Settings
from dicom_node.logs import kv
from dicom_node.models import (
    COMPLETE,
    REASON_FORCE,
    REASON_QUIET,
    RECEIVING,
    Instance,
    Series,
    Study,
    StudyRevision,
)
from dicom_node.periodic import Periodic

log = logging.getLogger("dicom_node.completion")


@dataclass(frozen=True)
class StudyCompleted:
    study_pk: int
    study_instance_uid: str
    revision: int
    reason: str  # quiet | force
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime
    instance_count: int  # instances that arrived in this revision
    series_uids: tuple[str, ...]  # series with instances in this revision

    @property
    def latency_seconds(self) -> float:
        """From the revision's last instance to its completion."""
        return (self.completed_at - self.last_received_at).total_seconds()


Subscriber = Callable[[StudyCompleted], None]


class CompletionMonitor:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self._read_engine = engine.execution_options(readonly=True)
        c = settings.completion
        self.study_quiet = timedelta(seconds=c.study_quiet_seconds)
        self.series_quiet = timedelta(seconds=c.series_quiet_seconds)
        self.force = timedelta(seconds=c.force_complete_seconds)
        self.interval = c.check_interval_seconds
        self._subscribers: list[Subscriber] = []
        self._loop = Periodic("completion-monitor", self.poll, lambda: self.interval, log)

    def on_study_complete(self, callback: Subscriber) -> Subscriber:
        """Register a subscriber (usable as a decorator)."""
        self._subscribers.append(callback)
        return callback

    # ------------------------------------------------------------------ one round

    def poll(self, now: datetime | None = None) -> list[StudyCompleted]:
        """Complete what is due at `now`, deliver undelivered completions; returns those delivered."""
        now = now or datetime.now(UTC)
        self._complete_series(now)
        for rev_id in self._due_revisions(now):
            self._complete_revision(rev_id, now)
        return self._deliver()

    def _complete_series(self, now: datetime) -> None:
        with Session(self.engine) as s:
            s.execute(
                update(Series)
                .where(Series.state == RECEIVING, Series.last_received_at <= now - self.series_quiet)
                .values(state=COMPLETE, completed_at=now)
            )
            s.commit()

    def _due_revisions(self, now: datetime) -> list[int]:
        with Session(self._read_engine) as s:
            rows = s.execute(
                select(StudyRevision.id).where(
                    StudyRevision.state == RECEIVING,
                    (StudyRevision.last_received_at <= now - self.study_quiet)
                    | (StudyRevision.first_received_at <= now - self.force),
                )
            ).all()
        return [r.id for r in rows]

    def _complete_revision(self, rev_id: int, now: datetime) -> None:
        with Session(self.engine) as s:
            rev = s.execute(select(StudyRevision).where(StudyRevision.id == rev_id)).scalar_one()
            # Same lock order as ingest: the study row first.
            s.execute(select(Study.id).where(Study.id == rev.study_pk).with_for_update()).one()
            s.refresh(rev)
            if rev.state != RECEIVING:
                return
            forced = rev.first_received_at <= now - self.force
            quiet = rev.last_received_at <= now - self.study_quiet
            series_open = s.execute(
                select(Series.id)
                .join(Instance, Instance.series_pk == Series.id)
                .where(
                    Instance.study_pk == rev.study_pk,
                    Instance.revision == rev.revision,
                    Series.state == RECEIVING,
                )
                .limit(1)
            ).first()
            if forced:
                reason = REASON_FORCE
                s.execute(
                    update(Series)
                    .where(Series.study_pk == rev.study_pk, Series.state == RECEIVING)
                    .values(state=COMPLETE, completed_at=now)
                )
            elif quiet and series_open is None:
                reason = REASON_QUIET
            else:
                return
            rev.state = COMPLETE
            rev.completed_at = now
            rev.reason = reason
            s.add(rev)
            s.commit()
            log.info(
                "study complete",
                extra=kv(study=rev.study_pk, revision=rev.revision, reason=reason, instances=rev.instance_count),
            )

    def _deliver(self) -> list[StudyCompleted]:
        with Session(self._read_engine) as s:
            rows = s.execute(
                select(StudyRevision, Study.study_instance_uid)
                .join(Study, Study.id == StudyRevision.study_pk)
                .where(StudyRevision.state == COMPLETE, StudyRevision.notified_at.is_(None))
                .order_by(StudyRevision.completed_at, StudyRevision.id)
            ).all()
            events = []
            for rev, study_uid in rows:
                series = s.execute(
                    select(Series.series_instance_uid)
                    .join(Instance, Instance.series_pk == Series.id)
                    .where(Instance.study_pk == rev.study_pk, Instance.revision == rev.revision)
                    .distinct()
                    .order_by(Series.series_instance_uid)
                ).all()
                events.append(
                    (
                        rev.id,
                        StudyCompleted(
                            study_pk=rev.study_pk,
                            study_instance_uid=study_uid,
                            revision=rev.revision,
                            reason=rev.reason or REASON_QUIET,
                            first_received_at=rev.first_received_at,
                            last_received_at=rev.last_received_at,
                            completed_at=rev.completed_at or datetime.now(UTC),
                            instance_count=rev.instance_count,
                            series_uids=tuple(r[0] for r in series),
                        ),
                    )
                )
        delivered = []
        for rev_id, ev in events:
            try:
                for callback in self._subscribers:
                    callback(ev)
            except Exception:
                log.exception("completion subscriber failed; will retry", extra=kv(study=ev.study_pk))
                continue
            with Session(self.engine) as s:
                s.execute(update(StudyRevision).where(StudyRevision.id == rev_id).values(notified_at=datetime.now(UTC)))
                s.commit()
            delivered.append(ev)
        return delivered

    # ------------------------------------------------------------------ background loop

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._loop.stop(timeout)
