"""The whole gateway in one process tree: what `unimedvl serve` and `unimedvl node` run.

node (listeners + completion monitor) -> planner/sweeper (jobs) -> workers -> outbox -> exporter,
plus the status API. `serve` also starts an embedded worker process on the embedded broker;
`node` leaves the workers to `unimedvl worker` processes on GPU machines.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from dicom_node.config import Settings
from dicom_node.export import Exporter
from dicom_node.jobs import JobService, Publisher, job_settings
from dicom_node.logs import kv
from dicom_node.node import Node
from dicom_node.storage import Storage

log = logging.getLogger("dicom_node.service")


class Service:
    def __init__(self, settings: Settings, *, api: bool, embedded_worker: bool) -> None:
        job_settings(settings)  # refuse a bad [jobs] table before anything starts
        self.settings = settings
        self.node = Node(settings)
        self.jobs = JobService.from_settings(settings, self.node.engine, embedded_worker=embedded_worker)
        if self.node.monitor is not None:
            self.jobs.attach(self.node.monitor)  # before the monitor starts
        storage = Storage(settings.storage.path, settings.storage.min_free_bytes)
        # No LABELMAP->BINARY re-rendering here: a destination that refuses LABELMAP ends the row
        # failed with a clear message (BINARY is the default segmentation type).
        self.exporter = Exporter(settings, self.node.engine, storage)
        self._export_stop = threading.Event()
        self._export_thread: threading.Thread | None = None
        self._api = api
        self._server: Any = None
        self._api_thread: threading.Thread | None = None

    def start(self) -> None:
        self.node.start()  # runs the migrations first
        self.jobs.start()
        self._export_thread = threading.Thread(
            target=self.exporter.run_forever, args=(self._export_stop,), name="exporter", daemon=True
        )
        self._export_thread.start()
        if self._api:
            self._start_api()

    def _start_api(self) -> None:
        import uvicorn

        from dicom_node.api import create_app

        app = create_app(
            self.settings,
            engine=self.node.engine,
            active_associations=self.node.active_associations,
            publisher=Publisher(self.settings.broker.url),
        )
        config = uvicorn.Config(
            app, host=self.settings.http.host, port=self.settings.http.port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._api_thread = threading.Thread(target=self._server.run, name="status-api", daemon=True)
        self._api_thread.start()
        log.info("status API", extra=kv(bind=self.settings.http.bind))

    def stop(self, grace_seconds: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self.jobs.begin_stop()  # the embedded worker takes no new message from here on
        self.node.stop(grace_seconds)  # no new instances, completion monitor stopped
        self.jobs.stop()
        self._export_stop.set()
        if self._export_thread is not None:
            self._export_thread.join(grace_seconds + 30)
        if self._api_thread is not None:
            self._api_thread.join(10)
