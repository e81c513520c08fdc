"""The exporter loop: claim due outbox rows, send them, record what the destination answered.

A row is marked done only after the destination confirmed storage (C-STORE 0x0000 or a
warning status; STOW-RS ReferencedSOPSequence). Transient failures are retried with
exponential backoff (equal jitter, capped); after `max_attempts` the row is failed with the
last DICOM status / HTTP code and a readable message. Permanent failures fail at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from dicom_node.export import metrics
from dicom_node.export.destinations import Destination, ExportPolicy, destinations_from_settings
from dicom_node.export.dimse import DimseSender
from dicom_node.export.fallback import Fallback, has_fallback
from dicom_node.export.models import DONE, FAILED, PENDING, SUPERSEDED, OutboxRow
from dicom_node.export.outbox import (
    RowUpdate,
    apply_updates,
    as_utc,
    claim_due,
    enqueue,
    fail_unconfigured,
    recover_expired,
    release_claim,
    renew_lease,
)
from dicom_node.export.outcome import Kind, Outcome, SendItem
from dicom_node.export.stow import StowSender
from dicom_node.export.wakeup import Wakeup
from dicom_node.leases import CLEARED, LeaseKeeper

log = logging.getLogger(__name__)

ResultHook = Callable[[str, SendItem, Outcome], None]
FLUSH_EVERY = 32  # outcomes buffered before a commit; a crash in between only causes a safe re-send
MIN_PER_CONNECTION = 8  # below this many instances per connection, parallel connections are not worth opening


def split_evenly(items: list[SendItem], parts: int) -> list[list[SendItem]]:
    """`parts` contiguous groups whose sizes differ by at most one (none empty)."""
    if not items:
        return []
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    groups, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        groups.append(items[start:end])
        start = end
    return groups


def backoff_seconds(attempts: int, policy: ExportPolicy, rng: random.Random | None = None) -> float:
    """Delay before attempt `attempts + 1`: initial * 2^(attempts-1), capped, with equal jitter."""
    base = min(policy.backoff_max_seconds, policy.backoff_initial_seconds * (2 ** max(0, attempts - 1)))
    r = (rng or random).random()
    return base * (0.5 + 0.5 * r)


@dataclass
class RoundResult:
    """What one run_once did, per destination."""

    sent: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)
    recovered: int = 0

    def add(self, bucket: dict[str, int], dest: str, n: int = 1) -> None:
        bucket[dest] = bucket.get(dest, 0) + n

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def attempted(self) -> int:
        return sum(self.sent.values()) + sum(self.retried.values()) + sum(self.failed.values())


class Exporter:
    def __init__(
        self,
        settings: Any,
        engine: Engine,
        storage: Any,
        *,
        fallback: Fallback | None = None,
        on_result: ResultHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = ExportPolicy.from_config(getattr(settings, "export", None))
        self.destinations: dict[str, Destination] = {d.name: d for d in destinations_from_settings(settings)}
        self.engine = engine
        self.storage = storage
        self.fallback = fallback
        self.on_result = on_result
        self.rng = rng or random.Random()
        self._lock = threading.Lock()  # guards result counters when destinations run in parallel
        self._stop: threading.Event | None = None
        # run_forever only: one association per DIMSE destination kept open between rounds.
        self._kept: dict[str, DimseSender] = {}
        self.wakeup = Wakeup(engine, list(self.destinations))  # started by run_forever

    # ------------------------------------------------------------------------------------- public

    def run_once(self, now: datetime | None = None, *, destinations: list[str] | None = None) -> RoundResult:
        """Send everything due at `now` (aware, or naive meaning UTC; default: the current time).

        `destinations` limits the round to those names (default: every configured destination).
        """
        start_logical = as_utc(now)
        start_wall = time.monotonic()

        def clock() -> datetime:  # the logical clock advances with real time during the round
            return start_logical + timedelta(seconds=time.monotonic() - start_wall)

        result = RoundResult()
        result.recovered = recover_expired(self.engine, start_logical)
        fail_unconfigured(self.engine, list(self.destinations), start_logical)
        dests = [d for d in self.destinations.values() if destinations is None or d.name in destinations]
        if len(dests) == 1:
            self._drain(dests[0], start_logical, clock, result)
        elif dests:
            with ThreadPoolExecutor(max_workers=len(dests), thread_name_prefix="export") as pool:
                for f in [pool.submit(self._drain, d, start_logical, clock, result) for d in dests]:
                    f.result()
        return result

    def run_forever(self, stop_event: threading.Event) -> None:
        """One loop per destination until `stop_event` is set: a destination that is down (connect
        timeouts) never delays another one's deliveries.

        Each loop sleeps until a commit that queued rows for its destination wakes it
        (dicom_node.export.wakeup: PostgreSQL NOTIFY, an SQLite datagram, an in-process commit), polling every
        `poll_seconds` as the safety net; an association to a DIMSE destination stays open for
        `keep_open_seconds` after its last use."""
        log.info(
            "exporter started: %d destination(s), woken by new rows, poll every %.2f s, keep associations %.1f s",
            len(self.destinations),
            self.policy.poll_seconds,
            self.policy.keep_open_seconds,
        )
        self._stop = stop_event
        if self.policy.keep_open_seconds > 0:
            self._kept = {
                d.name: DimseSender(d, keep_open_seconds=self.policy.keep_open_seconds)
                for d in self.destinations.values()
                if d.kind != "dicomweb"
            }
        self.wakeup.start()
        threads = [
            threading.Thread(target=self._loop, args=(name, stop_event), name=f"export-{name}", daemon=True)
            for name in self.destinations
        ]
        for t in threads:
            t.start()
        stop_event.wait()
        self.wakeup.wake(None)
        for t in threads:
            t.join()
        self.wakeup.stop()
        log.info("exporter stopped")

    def _loop(self, name: str, stop_event: threading.Event) -> None:
        kept = self._kept.get(name)
        try:
            while not stop_event.is_set():
                busy = False
                try:
                    busy = self.run_once(destinations=[name]).attempted > 0
                except Exception:  # keep the service alive; the DB state is consistent per transaction
                    log.exception("exporter round for %s failed; retrying after the poll interval", name)
                if busy:
                    continue
                timeout = self.policy.poll_seconds
                idle_left = kept.close_if_idle() if kept is not None else None
                if idle_left is not None:
                    timeout = min(timeout, idle_left)
                self.wakeup.wait(name, timeout)
                if kept is not None:
                    kept.close_if_idle()
        finally:
            if kept is not None:
                kept.close()

    # ------------------------------------------------------------------------------------- internals

    def _sender(self, dest: Destination, *, first: bool = False) -> DimseSender | StowSender:
        """A sender for one group; the first group of a batch reuses the kept association."""
        if first and dest.name in self._kept and self._stop is not None:
            return self._kept[dest.name]
        if dest.kind == "dicomweb":
            return StowSender(dest, max_instances=self.policy.stow_max_instances, max_bytes=self.policy.stow_max_bytes)
        return DimseSender(dest)

    def _drain(self, dest: Destination, due_at: datetime, clock: Callable[[], datetime], result: RoundResult) -> None:
        """Claim and send batches of rows due at `due_at` until none is left."""
        while self._stop is None or not self._stop.is_set():
            token, rows = claim_due(
                self.engine,
                dest.name,
                due_at,
                limit=self.policy.batch_size,
                lease_seconds=self.policy.lease_seconds,
            )
            if not rows:
                return
            self._send_rows(dest, token, rows, clock, result)
            # Loop even after a short batch: a LABELMAP fallback may have queued a row due now.

    def _send_rows(
        self,
        dest: Destination,
        token: str,
        rows: list[OutboxRow],
        clock: Callable[[], datetime],
        result: RoundResult,
    ) -> None:
        by_id = {r.id: r for r in rows}
        items: list[SendItem] = []
        pending: list[RowUpdate] = []
        for r in rows:
            try:
                path = Path(self.storage.path(r.relpath))
            except Exception as exc:  # a bad relpath must not stop the batch
                pending.append(self._final(r, FAILED, None, f"stored object unavailable: {exc}", clock(), result))
                continue
            if not path.is_file():
                msg = f"stored object is missing from storage ({r.relpath})"
                pending.append(self._final(r, FAILED, None, msg, clock(), result))
                continue
            item = SendItem(
                r.id or 0, path, r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax_uid, r.sha256, r.size
            )
            if has_fallback(r.sop_class_uid) and not dest.labelmap and self.fallback is not None:
                # Configured as not taking LABELMAP: re-render now instead of offering it first.
                why = Outcome(Kind.REFUSED, None, "destination configured with labelmap = false")
                pending.append(self._labelmap_fallback(dest, r, item, why, clock(), result))
                continue
            items.append(item)

        report_lock = threading.Lock()  # senders report from several threads (parallel associations)

        def report(item: SendItem, outcome: Outcome) -> None:
            flush: list[RowUpdate] = []
            with report_lock:
                row = by_id[item.row_id]
                pending.append(self._record(dest, row, item, outcome, clock(), result))
                if self.on_result is not None:
                    self.on_result(dest.name, item, outcome)
                if len(pending) >= FLUSH_EVERY:
                    flush = pending[:]
                    pending.clear()
            apply_updates(self.engine, token, flush)

        # Keep the lease fresh while sending: a short lease lets a crashed exporter's rows come back
        # quickly, and a long batch is never mistaken for an abandoned one.
        renewing = LeaseKeeper(
            lambda: renew_lease(self.engine, token, clock(), self.policy.lease_seconds),
            self.policy.lease_seconds,
            name=f"export {dest.name}",
        )
        try:
            with renewing:
                groups = split_evenly(items, min(self.policy.parallel, max(1, len(items) // MIN_PER_CONNECTION)))
                if len(groups) == 1:
                    self._sender(dest, first=True).send(groups[0], report)
                elif groups:
                    # Overlap our per-instance overhead with the PACS's processing time.
                    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix=f"export-{dest.name}") as pool:
                        senders = [self._sender(dest, first=i == 0) for i in range(len(groups))]
                        for f in [pool.submit(s.send, g, report) for s, g in zip(senders, groups, strict=True)]:
                            f.result()
        finally:
            apply_updates(self.engine, token, pending)
            pending.clear()
            # Anything the sender did not report on (an unexpected exception) goes back to pending.
            release_claim(self.engine, token, clock())

    @staticmethod
    def _release_values(now: datetime) -> dict[str, Any]:
        return {"state": PENDING, **CLEARED, "updated_at": now}

    def _final(
        self, row: OutboxRow, state: str, status: int | None, message: str, now: datetime, result: RoundResult
    ) -> RowUpdate:
        if state == FAILED:
            with self._lock:
                result.add(result.failed, row.destination)
            metrics.FAILED.labels(row.destination).inc()
            log.error("export %s: row %s failed: %s", row.destination, row.id, message)
        return RowUpdate(
            row.id or 0,
            {
                "state": state,
                "attempts": row.attempts + 1,
                "last_status": status,
                "last_error": message,
                "updated_at": now,
                **CLEARED,
            },
        )

    def _record(
        self, dest: Destination, row: OutboxRow, item: SendItem, out: Outcome, now: datetime, result: RoundResult
    ) -> RowUpdate:
        name = dest.name
        if out.kind is Kind.SKIPPED:
            with self._lock:
                result.add(result.released, name)
            return RowUpdate(row.id or 0, self._release_values(now))
        if out.delivered:
            values: dict[str, Any] = {
                "state": DONE,
                "attempts": row.attempts + 1,
                "done_at": now,
                "updated_at": now,
                "last_status": out.status if out.status is not None else 0,
                "last_error": out.message if out.kind is Kind.WARNING else None,
                **CLEARED,
            }
            metrics.SENT.labels(name).inc()
            with self._lock:
                result.add(result.sent, name)
            if out.kind is Kind.WARNING:
                values["warnings"] = row.warnings + 1
                metrics.WARNINGS.labels(name).inc()
                with self._lock:
                    result.add(result.warnings, name)
                log.warning("export %s: row %s delivered with warning: %s", name, row.id, out.message)
            elif out.message:
                log.info("export %s: row %s delivered: %s", name, row.id, out.message)
            return RowUpdate(row.id or 0, values)
        if out.kind is Kind.REFUSED and has_fallback(row.sop_class_uid):
            return self._labelmap_fallback(dest, row, item, out, now, result)
        attempts = row.attempts + 1
        if out.kind is Kind.RETRY and attempts < self.policy.max_attempts:
            delay = backoff_seconds(attempts, self.policy, self.rng)
            metrics.RETRIES.labels(name).inc()
            with self._lock:
                result.add(result.retried, name)
            log.warning(
                "export %s: row %s attempt %d/%d failed, next in %.1f s: %s",
                name,
                row.id,
                attempts,
                self.policy.max_attempts,
                delay,
                out.message,
            )
            return RowUpdate(
                row.id or 0,
                {
                    "state": PENDING,
                    "attempts": attempts,
                    "next_attempt_at": now + timedelta(seconds=delay),
                    "last_status": out.status,
                    "last_error": out.message,
                    "updated_at": now,
                    **CLEARED,
                },
            )
        message = out.message or "send failed"
        if out.kind is Kind.RETRY:
            message = f"gave up after {attempts} attempt(s): {message}"
        return self._final(row, FAILED, out.status, message, now, result)

    def _labelmap_fallback(
        self, dest: Destination, row: OutboxRow, item: SendItem, out: Outcome, now: datetime, result: RoundResult
    ) -> RowUpdate:
        refused = f"{dest.name} refuses Label Map Segmentation Storage ({out.message})"
        if self.fallback is None:
            return self._final(
                row, FAILED, out.status, f"{refused}; no LABELMAP->BINARY re-rendering available", now, result
            )
        try:
            binary = self.fallback(item.path.read_bytes())
        except Exception as exc:
            log.exception("export %s: LABELMAP->BINARY re-rendering of row %s failed", dest.name, row.id)
            return self._final(row, FAILED, out.status, f"{refused}; re-rendering as BINARY failed: {exc}", now, result)
        if binary is None:
            return self._final(row, FAILED, out.status, f"{refused}; it cannot be re-rendered as BINARY", now, result)
        new_rows = enqueue(
            self.engine,
            self.storage,
            binary,
            [dest.name],
            job_id=row.job_id,
            fallback_of=row.id,
            now=now,
            not_before=row.next_attempt_at,  # due in this same round
        )
        metrics.FALLBACKS.labels(dest.name).inc()
        log.warning(
            "export %s: row %s refused as LABELMAP; queued BINARY SEG as row %s", dest.name, row.id, new_rows[0].id
        )
        return RowUpdate(
            row.id or 0,
            {
                "state": SUPERSEDED,
                "attempts": row.attempts + 1,
                "last_status": out.status,
                "last_error": f"{refused}; re-rendered as BINARY SEG, outbox row {new_rows[0].id}",
                "updated_at": now,
                **CLEARED,
            },
        )
