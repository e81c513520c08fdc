"""Prometheus metrics for delivery, labelled by destination (served by the status API's /metrics).

Counters count events in this process; the outbox collector reads row counts per destination
and state from the database at scrape time (the same for every process, survives restarts).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from dicom_node.export.models import STATES, OutboxRow

SENT = Counter("unimedvl_export_sent", "Instances delivered (destination confirmed storage)", ["destination"])
WARNINGS = Counter(
    "unimedvl_export_warnings", "Instances delivered with a warning status (e.g. 0xB000)", ["destination"]
)
RETRIES = Counter("unimedvl_export_retries", "Send attempts that failed and were scheduled again", ["destination"])
FAILED = Counter("unimedvl_export_failed", "Instances that ended in the failed state", ["destination"])
FALLBACKS = Counter(
    "unimedvl_export_fallbacks", "LABELMAP SEGs re-rendered as BINARY after a destination refused them", ["destination"]
)


class OutboxCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "unimedvl_outbox_rows", "Outbox rows by destination and state", labels=["destination", "state"]
        )
        with Session(self.engine) as s:
            counts = s.exec(
                select(OutboxRow.destination, OutboxRow.state, func.count()).group_by(
                    OutboxRow.destination, OutboxRow.state
                )
            ).all()
        per_dest: dict[str, dict[str, int]] = {}
        for dest, state, n in counts:
            per_dest.setdefault(dest, dict.fromkeys(STATES, 0))[state] = n
        for dest, states in sorted(per_dest.items()):
            for state, n in states.items():
                g.add_metric([dest, state], n)
        yield g
