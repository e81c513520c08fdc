"""Series counts from the sending PACS: a C-FIND at SERIES level for Number of Series Related
Instances (0020,1209), PS3.4 C.6.1.1.4 / C.3.5 (an optional return key; a PACS that does not
answer it leaves the series to the other rules).

Opt-in per calling AE (`completion.count_sources`): the first instance of a series arriving from
that AE starts one query in the background (never delaying the C-STORE response); the answer is
stored as `series.queried_instances` and the completion monitor (dicom_node/completion.py)
completes the series once that many instances have arrived. A PACS still receiving the series
itself answers with what it has so far: use it for a PACS that forwards stored studies.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from dicom_node.config import CountSourceSettings
from dicom_node.ingest import printable
from dicom_node.logs import kv
from dicom_node.models import Series

log = logging.getLogger("dicom_node.count_query")

PENDING = (0xFF00, 0xFF01)  # C-FIND pending statuses: one match each (PS3.4 C.4.1.1.4)


def series_instance_count(source: CountSourceSettings, calling_ae: str, study_uid: str, series_uid: str) -> int | None:
    """The PACS's Number of Series Related Instances for one series, or None (no association,
    no single match, no usable value, or a timeout)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = source.timeout_seconds
    ae.connection_timeout = source.timeout_seconds
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        return None
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.NumberOfSeriesRelatedInstances = None
    values: list[int] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status is None:  # timeout or aborted
                return None
            if status.Status in PENDING and identifier is not None:
                try:
                    values.append(int(identifier.get("NumberOfSeriesRelatedInstances")))
                except (TypeError, ValueError):
                    return None
    finally:
        if assoc.is_established:
            assoc.release()
    return values[0] if len(values) == 1 and values[0] >= 1 else None


class CountQueries:
    """Starts one background count query per series arriving from a configured calling AE."""

    def __init__(
        self,
        engine: Engine,
        sources: Sequence[CountSourceSettings],
        our_ae: str,
        on_count: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.sources = {s.calling_ae: s for s in sources}
        self.our_ae = our_ae
        self.on_count = on_count
        self._asked: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="count-query")

    def seen(self, calling_ae: str, study_uid: str, series_uid: str) -> None:
        """An instance of `series_uid` arrived from `calling_ae`: ask its PACS once per series."""
        source = self.sources.get(calling_ae)
        if source is None or not series_uid:
            return
        with self._lock:
            if series_uid in self._asked:
                return
            if len(self._asked) > 100_000:
                self._asked.clear()
            self._asked.add(series_uid)
        self._pool.submit(self._ask, source, study_uid, series_uid)

    def _ask(self, source: CountSourceSettings, study_uid: str, series_uid: str) -> None:
        try:
            n = series_instance_count(source, self.our_ae, study_uid, series_uid)
        except Exception:
            log.exception("count query failed", extra=kv(source=printable(source.ae_title)))
            return
        if n is None:
            log.info("count query gave no count", extra=kv(source=printable(source.ae_title)))
            return
        with Session(self.engine) as s:
            s.execute(update(Series).where(Series.series_instance_uid == series_uid).values(queried_instances=n))
            s.commit()
        log.info("series count from source", extra=kv(source=printable(source.ae_title), instances=n))
        if self.on_count is not None:
            self.on_count()

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
