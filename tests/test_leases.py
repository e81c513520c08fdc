"""dicom_node.leases, the one claim-token + lease + renew implementation, on both tables that
use it (jobs and outbox rows), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from dicom_node import leases
from dicom_node.db import init_db, make_engine
from dicom_node.export.models import OutboxRow
from dicom_node.jobs.models import Job
from dicom_node.jobs.settings import as_utc, utcnow

T0 = utcnow()


def _job(i: int) -> Job:
    return Job(
        idempotency_key=f"k{i}",
        study_instance_uid="1.2.3",
        revision=1,
        rule="r",
        kind="report",
        model_version="tiny",
        queue="unimedvl.understanding",
        created_at=T0,
        updated_at=T0,
    )


def _outbox(i: int) -> OutboxRow:
    return OutboxRow(
        created_at=T0,
        updated_at=T0,
        relpath=f"objects/{i}",
        sha256="0" * 64,
        size=1,
        sop_instance_uid=f"1.2.3.{i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        destination="pacs",
        next_attempt_at=T0,
    )


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    init_db(db_url)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(params=["job", "outbox"])
def table(request: pytest.FixtureRequest, engine: Engine) -> Any:
    model, make = (Job, _job) if request.param == "job" else (OutboxRow, _outbox)
    with Session(engine) as s:
        s.add_all([make(i) for i in range(3)])
        s.commit()
    return model


def _claim(engine: Engine, model: Any, now: Any, lease_seconds: float = 30) -> tuple[str, int]:
    with Session(engine) as s:
        free = (col(model.claim_token).is_(None)) | leases.expired(model, now)
        token, n = leases.claim(s, model, [free], now=now, lease_seconds=lease_seconds, updated_at=now)
        s.commit()
    return token, n


def _held(engine: Engine, model: Any, token: str) -> list[Any]:
    with Session(engine) as s:
        return list(s.exec(select(model).where(leases.held(model, token))))


def test_claim_renew_take_over_and_release(engine: Engine, table: Any) -> None:
    token, n = _claim(engine, table, T0)
    assert n == 3 and len(_held(engine, table, token)) == 3
    assert _claim(engine, table, T0 + timedelta(seconds=10))[1] == 0  # held under a live lease

    # Renewal moves the lease forward from "now".
    assert leases.renew(engine, table, token, now=T0 + timedelta(seconds=20), lease_seconds=30) == 3
    assert {as_utc(r.lease_until) for r in _held(engine, table, token)} == {T0 + timedelta(seconds=50)}
    assert _claim(engine, table, T0 + timedelta(seconds=40))[1] == 0

    # The holder stopped renewing: after the lease, another holder takes the rows over, and the
    # old holder's renewals (and any write conditioned on its token) touch nothing.
    other, n = _claim(engine, table, T0 + timedelta(seconds=51))
    assert n == 3 and other != token
    assert leases.renew(engine, table, token, now=T0 + timedelta(seconds=52), lease_seconds=30) == 0
    assert _held(engine, table, token) == []

    assert leases.release(engine, table, other, updated_at=T0) == 3
    rows = _held(engine, table, other)
    assert rows == []
    with Session(engine) as s:
        assert {(r.claim_token, r.lease_until) for r in s.exec(select(table))} == {(None, None)}


def test_keeper_renews_until_the_rows_are_taken_over(engine: Engine, table: Any) -> None:
    token, _ = _claim(engine, table, utcnow(), lease_seconds=0.6)
    renewed = threading.Event()
    calls: list[int] = []

    def renew_once() -> int:
        n = leases.renew(engine, table, token, now=utcnow(), lease_seconds=0.6)
        calls.append(n)
        renewed.set()
        return n

    with leases.LeaseKeeper(renew_once, 0.6, name="test", stop_when_lost=True) as keeper:
        assert renewed.wait(10) and calls[0] == 3
        with Session(engine) as s:  # another holder takes the rows (as after an expired lease)
            s.execute(leases_update(table, token))
            s.commit()
        assert keeper.lost.wait(10)
    assert calls[-1] == 0


def leases_update(model: Any, token: str) -> Any:
    from sqlalchemy import update

    return update(model).where(leases.held(model, token)).values(claim_token=leases.new_token())


def test_a_job_heartbeat_after_its_own_completion_is_not_a_loss(engine: Engine) -> None:
    """The keeper may beat between the worker's final commit and its stop: that is not 'claim lost'."""
    from sqlalchemy import update

    from dicom_node.jobs.models import DONE
    from dicom_node.jobs.runner import claim, renew

    with Session(engine) as s:
        s.add(_job(0))
        s.commit()
    c = claim(engine, 1, "w")
    assert c is not None and renew(engine, c)
    with Session(engine) as s:  # what complete() leaves: done, lease cleared, the token kept
        s.execute(update(Job).where(col(Job.id) == 1).values(state=DONE, lease_until=None))
        s.commit()
    assert renew(engine, c)
    with Session(engine) as s:  # taken over by another claim: lost
        s.execute(update(Job).where(col(Job.id) == 1).values(state="running", claim_token=leases.new_token()))
        s.commit()
    assert not renew(engine, c)
