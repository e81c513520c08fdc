"""Delivery of result objects to PACS destinations: outbox table, C-STORE SCU, STOW-RS, retries.

rows = enqueue(engine, storage, dataset_or_bytes, ["pacs"])   # stored + queued before any send
Exporter(settings, engine, storage).run_forever(stop_event)    # or .run_once(now)
"""

from dicom_node.export.destinations import Destination, ExportPolicy
from dicom_node.export.exporter import Exporter, RoundResult, backoff_seconds
from dicom_node.export.fallback import Fallback
from dicom_node.export.models import DONE, FAILED, PENDING, SENDING, SUPERSEDED, OutboxRow
from dicom_node.export.outbox import EnqueueError, enqueue, requeue, summary

__all__ = [
    "DONE",
    "FAILED",
    "PENDING",
    "SENDING",
    "SUPERSEDED",
    "Destination",
    "EnqueueError",
    "ExportPolicy",
    "Exporter",
    "Fallback",
    "OutboxRow",
    "RoundResult",
    "backoff_seconds",
    "enqueue",
    "requeue",
    "summary",
]
