"""Claim tokens and leases on DB rows: the one implementation behind job claims and outbox batches.

A holder takes rows with ONE conditional UPDATE (`claim`) that sets a fresh `claim_token` and
`lease_until = now + lease`, so two holders never get the same row. While it works, a
`LeaseKeeper` thread renews the lease every lease/3 seconds (`renew`: UPDATE ... WHERE
claim_token = token); a holder that stops renewing (killed, hung, host lost) loses its rows
once the lease runs out, and whoever sweeps expired leases hands them out again. Every write a
holder makes afterwards is conditioned on its token (`held`), so a holder whose rows were
taken over writes nothing. Used by dicom_node/jobs/runner.py (a job per claim) and
dicom_node/export/outbox.py (a batch of rows per claim).

The model passed in is any SQLModel table with `claim_token` (text) and `lease_until`
(aware UTC datetime) columns. Times are aware UTC datetimes, durations seconds. Database errors
(SQLAlchemy's) propagate from every function; `LeaseKeeper` logs them and tries again.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

log = logging.getLogger("dicom_node.leases")

# Renewals per lease: two may fail (DB hiccup, a starved machine) before the lease runs out.
RENEWALS_PER_LEASE = 3


# The end states of leased work, shared by jobs and outbox rows (the API and CLI show both).
DONE = "done"
FAILED = "failed"

# The values that end a claim (done, failed, released, swept): no holder, no lease.
CLEARED: dict[str, Any] = {"claim_token": None, "lease_until": None}


def new_token() -> str:
    """A fresh claim token (32 hex characters)."""
    return uuid.uuid4().hex


def lease_end(now: datetime, lease_seconds: float) -> datetime:
    return now + timedelta(seconds=lease_seconds)


def held(model: Any, token: str) -> ColumnElement[bool]:
    """The condition "this row is still held under `token`"."""
    return col(model.claim_token) == token


def expired(model: Any, now: datetime) -> ColumnElement[bool]:
    """The condition "the holder's lease ran out before `now`" (the holder stopped renewing)."""
    return col(model.lease_until) < now


def claim(
    session: Session,
    model: Any,
    where: Sequence[ColumnElement[bool]],
    *,
    now: datetime,
    lease_seconds: float,
    token: str | None = None,
    **values: Any,
) -> tuple[str, int]:
    """Take the rows matching `where` under a new token and lease, setting `values` too.

    One UPDATE, so concurrent claimers never share a row; the caller commits. Returns
    (token, number of rows taken).
    """
    token = token or new_token()
    n = session.execute(
        update(model)
        .where(*where)
        .values(claim_token=token, lease_until=lease_end(now, lease_seconds), **values)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return token, n or 0


def renew(
    engine: Engine,
    model: Any,
    token: str,
    *,
    now: datetime,
    lease_seconds: float,
    where: Sequence[ColumnElement[bool]] = (),
    **values: Any,
) -> int:
    """Extend the lease of the rows still held under `token` (and matching `where`); their count.

    0 means the holder has nothing left under this token: it was taken over, or released.
    """
    with Session(engine) as s:
        n = s.execute(
            update(model)
            .where(held(model, token), *where)
            .values(lease_until=lease_end(now, lease_seconds), **values)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        s.commit()
    return n or 0


def release(engine: Engine, model: Any, token: str, **values: Any) -> int:
    """Give back the rows still held under `token` (token and lease cleared, `values` set); their count."""
    with Session(engine) as s:
        n = s.execute(
            update(model)
            .where(held(model, token))
            .values(**CLEARED, **values)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        s.commit()
    return n or 0


class LeaseKeeper:
    """A daemon thread that calls `renew_once()` every lease/3 seconds while a holder works.

        with LeaseKeeper(lambda: renew(...), lease_seconds, name="job-7") as keeper:
            ...                      # keeper.lost is set once renew_once() returned 0
                                     # (only with stop_when_lost: the rows were taken over)

    A renewal that raises (DB restarting) is logged and tried again at the next beat: the lease
    leaves room for RENEWALS_PER_LEASE - 1 failures.
    """

    def __init__(
        self,
        renew_once: Callable[[], int],
        lease_seconds: float,
        *,
        name: str,
        stop_when_lost: bool = False,
        min_interval: float = 0.0,
    ) -> None:
        self.renew_once = renew_once
        self.interval = max(min_interval, lease_seconds / RENEWALS_PER_LEASE)
        self.name = name
        self.stop_when_lost = stop_when_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{name}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.renew_once() == 0 and self.stop_when_lost:
                    self.lost.set()
                    log.warning("%s: claim lost (lease expired and taken over); its result will be dropped", self.name)
                    return
            except Exception as exc:  # the next beat tries again; the lease has margin
                log.warning("%s: lease renewal failed (%s)", self.name, type(exc).__name__)
