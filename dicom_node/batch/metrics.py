"""Prometheus metrics of research batches, read from the batch tables at scrape time (items run
in worker processes, so in-process counters would miss them; the tables survive restarts)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from dicom_node.batch.models import ITEM_STATES, BatchItem


class BatchCollector(Collector):
    """`unimedvl_batch_items{state}` (gauge, all batches) and `unimedvl_batch_item_crashes`
    (counter: item attempts that ended in an unexpected exception, each retried or failed)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        with Session(self.engine) as s:
            per_state = dict(s.exec(select(BatchItem.state, func.count()).group_by(BatchItem.state)).all())
            crashes = s.exec(select(func.coalesce(func.sum(BatchItem.crashes), 0))).one()
        g = GaugeMetricFamily("unimedvl_batch_items", "Research batch items (studies) by state", labels=["state"])
        for state in ITEM_STATES:
            g.add_metric([state], per_state.get(state, 0))
        yield g
        yield CounterMetricFamily(
            "unimedvl_batch_item_crashes",
            "Batch item attempts that ended in an unexpected exception (bugs, not bad input)",
            value=crashes,
        )
