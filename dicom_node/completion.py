"""Study completion: decide from the DB when a study (revision) has stopped arriving.

Known completion first, timers as the fall-back:
- ("mpps") a Modality Performed Procedure Step reported COMPLETED or DISCONTINUED (PS3.4 Annex F,
  dicom_node/mpps.py) completes the series it lists as soon as every instance it lists has
  arrived (at once, or when the last one lands);
- ("count") a series whose every instance carries the same ImagesInAcquisition (0020,1002,
  PS3.3 C.7.6.1) and AcquisitionNumber completes when that many instances have arrived, as does
  one whose sending PACS answered our C-FIND with its Number of Series Related Instances
  (dicom_node/count_query.py, opt-in per calling AE);
- ("quiet") otherwise a series is complete when no instance arrived for `series_quiet_seconds`.
  A series that announced a count it has not reached, and every series of a study with an
  MPPS still IN PROGRESS (or COMPLETED with instances missing), is held back from the quiet
  rule until `announced_wait_seconds` after its last instance.
- A study revision completes early (reason mpps/count) once every series it touched completed
  by mpps or count and no MPPS of the study is pending; else ("quiet") when no instance arrived
  for `study_quiet_seconds` and every series it touched is complete (and nothing holds it), or
  ("force") `force_complete_seconds` after its first instance even if instances keep trickling in.
- An instance arriving after completion opens revision n+1 (dicom_node.ingest), never merging
  silently into work already dispatched.

All state lives in the DB, so a restarted monitor recomputes every timer from the stored
timestamps. The background loop sleeps until the earliest of those timers (`next_deadline`) or
until woken (`wake`: an MPPS ended, a count reached, a new series or revision opened, or, while
a COMPLETED step still waits for instances it lists, any new instance; see `CompletionWaker`),
with `check_interval_seconds` only as the safety net. Subscribers (`on_study_complete`) run
after the completion commit; a revision is marked `notified_at` only when all of them returned,
so a crash in between re-delivers it on the next poll (at-least-once: subscribers must be
idempotent per (study, revision)).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from dicom_node.config import Settings
from dicom_node.logs import kv
from dicom_node.models import (
    COMPLETE,
    MPPS_FINAL,
    REASON_COUNT,
    REASON_FORCE,
    REASON_MPPS,
    REASON_QUIET,
    RECEIVING,
    Instance,
    Mpps,
    MppsReference,
    MppsStudy,
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
    reason: str  # quiet | force | mpps | count
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

EARLY = (REASON_MPPS, REASON_COUNT)


def _pending_mpps_studies() -> Any:
    """Study ids named by an MPPS not yet applied (IN PROGRESS, or final with instances missing):
    every study of its Scheduled Step Attributes Sequence."""
    return (
        select(Study.id)
        .join(MppsStudy, MppsStudy.study_instance_uid == Study.study_instance_uid)
        .join(Mpps, Mpps.id == MppsStudy.mpps_pk)
        .where(Mpps.applied_at.is_(None))
    )


def _pending_mpps_series() -> Any:
    """Series UIDs listed by an MPPS not yet applied (its study may be named differently)."""
    return (
        select(MppsReference.series_instance_uid)
        .join(Mpps, Mpps.id == MppsReference.mpps_pk)
        .where(Mpps.applied_at.is_(None))
    )


class Flag:
    """A bool with `.value`, like the `multiprocessing.Value("b")` that replaces it across processes."""

    def __init__(self) -> None:
        self.value = 0


class CompletionWaker:
    """What a listener calls after storing an instance, and on MPPS / count events (`waker()`).

    It wakes the monitor (through `wake`: `CompletionMonitor.wake` in the same process, a
    cross-process notification otherwise) when the monitor has something new to time or decide:
    the series reached its count, a (series, revision) this process has not seen opened (a new
    quiet deadline the sleeping monitor does not know), or the monitor asked for every instance
    (`every_instance.value`, set while a COMPLETED/DISCONTINUED step waits for instances it lists).
    Further instances of a known series only move its deadline later, which the monitor finds
    when it wakes at the earlier one.
    """

    MAX_KEYS = 50_000  # then forget them all: costs one extra wake per open series

    def __init__(self, wake: Callable[[], None], every_instance: Any | None = None) -> None:
        self.wake = wake
        self.every_instance = every_instance if every_instance is not None else Flag()
        self._seen: set[tuple[str, int]] = set()  # races between threads only cost a second wake

    def __call__(self) -> None:
        self.wake()

    def stored(self, outcome: Any) -> None:
        """After `Ingest.receive*` returned `outcome` (an `ingest.Outcome`) for a committed instance."""
        if outcome.action not in ("stored", "duplicate_replaced"):  # nothing new for the study
            return
        key = (outcome.series_instance_uid, outcome.revision)
        new = key not in self._seen
        if new:
            if len(self._seen) >= self.MAX_KEYS:
                self._seen.clear()
            self._seen.add(key)
        if new or outcome.count_reached or self.every_instance.value:
            self.wake()


class CompletionMonitor:
    def __init__(self, engine: Engine, settings: Settings, every_instance: Any | None = None) -> None:
        self.engine = engine
        self._read_engine = engine.execution_options(readonly=True)
        c = settings.completion
        self.study_quiet = timedelta(seconds=c.study_quiet_seconds)
        self.series_quiet = timedelta(seconds=c.series_quiet_seconds)
        self.force = timedelta(seconds=c.force_complete_seconds)
        self.announced_wait = timedelta(seconds=c.announced_wait_seconds)
        self.use_counts = c.images_in_acquisition
        self.interval = c.check_interval_seconds  # the safety net: deadlines and wake-ups come first
        # Set while a final MPPS waits for instances it lists: listeners then wake us per instance.
        self.every_instance = every_instance if every_instance is not None else Flag()
        self._awaiting = False
        self._subscribers: list[Subscriber] = []
        self._next_wait = 0.0
        self._loop = Periodic("completion-monitor", self._round, lambda: self._next_wait, log)

    def on_study_complete(self, callback: Subscriber) -> Subscriber:
        """Register a subscriber (usable as a decorator)."""
        self._subscribers.append(callback)
        return callback

    # ------------------------------------------------------------------ one round

    def poll(self, now: datetime | None = None) -> list[StudyCompleted]:
        """Complete what is due at `now`, deliver undelivered completions; returns those delivered."""
        now = now or datetime.now(UTC)
        self._apply_mpps(now)
        self._complete_counted(now)
        self._complete_series(now)
        for rev_id in self._due_revisions(now):
            self._complete_revision(rev_id, now)
        return self._deliver()

    def wake(self) -> None:
        """Run the next round now (an MPPS was completed, a count reached): no wait for the interval."""
        self._loop.wake()

    def _round(self) -> None:
        """One round of the background loop, then how long to sleep: until the next deadline,
        at most `check_interval_seconds`."""
        self._next_wait = self.interval  # if the round fails, retry after the safety interval
        now = datetime.now(UTC)
        was = self.every_instance.value
        self.poll(now)
        self.every_instance.value = int(self._awaiting)
        if self._awaiting and not was:
            # An instance committed before the listeners saw the flag was not announced: look again.
            self._next_wait = 0.0
            return
        deadline = self.next_deadline(now)
        if deadline is not None:
            wait = (deadline - datetime.now(UTC)).total_seconds() + 0.001  # not a hair early
            self._next_wait = max(0.0, min(self.interval, wait))

    def next_deadline(self, now: datetime) -> datetime | None:
        """The earliest time after `now` at which a timer of an open series, revision or MPPS step
        ends (quiet periods, announced wait, force, MPPS give-up); None when nothing is open.

        Each timer is `column + offset`, so "ends after now" is `column > now - offset`: min()
        over rows still open, then the offset added in Python (no date arithmetic in SQL)."""
        give_up = max(self.force, self.announced_wait)
        timers = [
            (Series.last_received_at, self.series_quiet, Series.state == RECEIVING),
            (Series.last_received_at, self.announced_wait, Series.state == RECEIVING),
            (StudyRevision.last_received_at, self.study_quiet, StudyRevision.state == RECEIVING),
            (StudyRevision.last_received_at, self.announced_wait, StudyRevision.state == RECEIVING),
            (StudyRevision.first_received_at, self.force, StudyRevision.state == RECEIVING),
            (Mpps.updated_at, give_up, Mpps.applied_at.is_(None)),
        ]
        query = select(
            *(select(func.min(col)).where(open_, col > now - offset).scalar_subquery() for col, offset, open_ in timers)
        )
        with Session(self._read_engine) as s:
            row = s.execute(query).one()
        ends = [at + offset for at, (_, offset, _) in zip(row, timers, strict=True) if at is not None]
        return min(ends, default=None)

    def _apply_mpps(self, now: datetime) -> None:
        """Complete the series of each COMPLETED/DISCONTINUED MPPS whose listed instances have all
        arrived, and mark it applied (instances arriving later open a revision as usual).

        A step not updated for max(force_complete_seconds, announced_wait_seconds) (never ended,
        or listing instances that never came) is given up: marked applied without completing
        anything, so it stops holding its study. A later N-SET makes it pending again.
        Reads first, writes only when there is something to write (SQLite has one writer)."""
        give_up = now - max(self.force, self.announced_wait)
        with Session(self._read_engine) as s:
            pending = s.execute(
                select(Mpps.id, Mpps.state, Mpps.updated_at).where(Mpps.applied_at.is_(None)).order_by(Mpps.id)
            ).all()
            stale = [p.id for p in pending if p.updated_at <= give_up]
            whole = [
                p.id
                for p in pending
                if p.state in MPPS_FINAL
                and p.id not in stale
                and not s.execute(
                    select(
                        exists().where(
                            MppsReference.mpps_pk == p.id,
                            ~exists().where(Instance.sop_instance_uid == MppsReference.sop_instance_uid),
                        )
                    )
                ).scalar()
            ]
        self._awaiting = any(p.state in MPPS_FINAL and p.id not in stale and p.id not in whole for p in pending)
        if stale:
            with Session(self.engine) as s:
                s.execute(update(Mpps).where(Mpps.id.in_(stale), Mpps.applied_at.is_(None)).values(applied_at=now))
                s.commit()
            log.warning("mpps given up", extra=kv(steps=len(stale)))
        for mpps_pk in whole:
            with Session(self.engine) as s:
                listed = select(MppsReference.series_instance_uid).where(MppsReference.mpps_pk == mpps_pk)
                done = s.execute(
                    update(Series)
                    .where(Series.series_instance_uid.in_(listed), Series.state == RECEIVING)
                    .values(state=COMPLETE, completed_at=now, completion_reason=REASON_MPPS)
                ).rowcount
                # Only if no N-SET made it pending again meanwhile (then the next round decides).
                s.execute(update(Mpps).where(Mpps.id == mpps_pk, Mpps.applied_at.is_(None)).values(applied_at=now))
                s.commit()
            log.info("mpps applied", extra=kv(mpps=mpps_pk, series_completed=done))

    def _counts(self, compare: Any) -> list[Any]:
        """Per count source, `compare(instance_count, announced count)` where the count is known."""
        out = [and_(Series.queried_instances.is_not(None), compare(Series.instance_count, Series.queried_instances))]
        if self.use_counts:
            out.append(
                and_(
                    Series.count_known,
                    Series.expected_instances.is_not(None),
                    compare(Series.instance_count, Series.expected_instances),
                )
            )
        return out

    def _complete_counted(self, now: datetime) -> None:
        """Exactly the announced number: more (a late instance, a wrong count) leaves the series
        to the quiet rule, so late instances are not cut into one revision each."""
        reached = (Series.state == RECEIVING, or_(*self._counts(lambda n, c: n == c)))
        with Session(self._read_engine) as s:
            if s.execute(select(Series.id).where(*reached).limit(1)).first() is None:
                return
        with Session(self.engine) as s:
            s.execute(
                update(Series).where(*reached).values(state=COMPLETE, completed_at=now, completion_reason=REASON_COUNT)
            )
            s.commit()

    def _complete_series(self, now: datetime) -> None:
        announced = [
            Series.study_pk.in_(_pending_mpps_studies()),
            Series.series_instance_uid.in_(_pending_mpps_series()),
            *self._counts(lambda n, c: n < c),  # a count not reached yet
        ]
        with Session(self.engine) as s:
            s.execute(
                update(Series)
                .where(
                    Series.state == RECEIVING,
                    Series.last_received_at <= now - self.series_quiet,
                    or_(~or_(*announced), Series.last_received_at <= now - self.announced_wait),
                )
                .values(state=COMPLETE, completed_at=now, completion_reason=REASON_QUIET)
            )
            s.commit()

    def _due_revisions(self, now: datetime) -> list[int]:
        early = exists().where(
            Series.study_pk == StudyRevision.study_pk,
            Series.state == COMPLETE,
            Series.completion_reason.in_(EARLY),
            Series.completed_at >= StudyRevision.first_received_at,
        )
        with Session(self._read_engine) as s:
            rows = s.execute(
                select(StudyRevision.id).where(
                    StudyRevision.state == RECEIVING,
                    (StudyRevision.last_received_at <= now - self.study_quiet)
                    | (StudyRevision.first_received_at <= now - self.force)
                    | early,
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
            touched = s.execute(
                select(Series.state, Series.completion_reason)
                .join(Instance, Instance.series_pk == Series.id)
                .where(Instance.study_pk == rev.study_pk, Instance.revision == rev.revision)
                .distinct()
            ).all()
            all_complete = all(t.state == COMPLETE for t in touched)
            reasons = {t.completion_reason for t in touched}
            held = rev.last_received_at > now - self.announced_wait and rev.study_pk in set(
                s.execute(_pending_mpps_studies()).scalars()
            )
            if forced:
                reason = REASON_FORCE
                s.execute(
                    update(Series)
                    .where(Series.study_pk == rev.study_pk, Series.state == RECEIVING)
                    .values(state=COMPLETE, completed_at=now, completion_reason=REASON_FORCE)
                )
            elif touched and all_complete and not held and reasons <= set(EARLY):
                reason = REASON_MPPS if REASON_MPPS in reasons else REASON_COUNT
            elif quiet and all_complete and not held:
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
