"""The running node: migrations, storage sweep, listener(s) and the completion monitor.

With `[node] listeners = 1` the listener runs as threads of this process. With N > 1, N
listener processes bind the same port with SO_REUSEPORT (the kernel spreads connections
across them, which sidesteps the GIL); this process supervises them (restarts one that dies)
and runs the completion monitor. Every process writes to the same index and storage.

Listeners wake the monitor (`completion.CompletionWaker`): in-process by `CompletionMonitor.wake`;
from listener processes by a notification on `export.wakeup.COMPLETION` (PostgreSQL NOTIFY, or a
datagram to the abstract socket named after the SQLite file) that the supervisor listens for.
A shared byte (`every_instance`) tells them when the monitor wants to hear of every instance.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from functools import partial
from typing import Any

from dicom_node.completion import CompletionMonitor, CompletionWaker
from dicom_node.config import Settings
from dicom_node.db import init_db, make_engine
from dicom_node.export.wakeup import COMPLETION, Wakeup, announce
from dicom_node.heap import freeze_long_lived
from dicom_node.ingest import Ingest
from dicom_node.logs import guard_phi, kv, setup_logging
from dicom_node.metrics import observe_completion
from dicom_node.reconcile import reconcile
from dicom_node.scp import ActiveAssociations, Listener
from dicom_node.storage import Storage

log = logging.getLogger("dicom_node.node")


def node_engine(settings: Settings) -> Any:
    """An engine whose pool lets every allowed association hold a connection while it indexes."""
    return make_engine(
        settings.database.url, pool_size=5, max_overflow=settings.node.max_associations + 5, pool_timeout=60
    )


def make_ingest(settings: Settings, engine: Any = None) -> Ingest:
    storage = Storage(settings.storage.path, settings.storage.min_free_bytes)
    return Ingest(
        engine if engine is not None else node_engine(settings),
        storage,
        max_instance_bytes=settings.node.max_instance_bytes,
        duplicate_policy=settings.node.duplicate_policy,
        log_phi=settings.node.log_phi,
    )


def _listener_process(settings: Settings, slot: int, shared: Any, ready: Any, every_instance: Any) -> None:
    """Entry point of one listener process (spawned). `every_instance` is None without a monitor."""
    setup_logging()
    guard_phi(settings.node.log_phi)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ingest = make_ingest(settings)
    waker = None
    if every_instance is not None:  # the monitor runs in the supervisor: wake it by notification
        waker = CompletionWaker(partial(announce, ingest.engine, COMPLETION), every_instance)
    listener = Listener(
        settings, ingest, reuse_port=True, active=ActiveAssociations(shared, slot), wake_completion=waker
    )
    listener.start()
    freeze_long_lived()  # this process is ours from here on (see dicom_node/heap.py)
    ready.set()
    while not stop.wait(0.5):
        if os.getppid() == 1:  # the supervisor died: do not linger as an orphan
            break
    listener.stop()
    ingest.close()
    ingest.engine.dispose()


class Node:
    def __init__(self, settings: Settings, *, completion: bool = True) -> None:
        self.settings = settings
        self.engine = node_engine(settings)
        self._ctx = mp.get_context("spawn")
        # Set by the monitor while it wants every instance announced (shared with listener processes).
        self._every_instance = self._ctx.Value("b", 0, lock=False) if completion else None
        self.monitor = CompletionMonitor(self.engine, settings, self._every_instance) if completion else None
        if self.monitor is not None:
            self.monitor.on_study_complete(observe_completion)
        self._monitor_wakeup: Wakeup | None = None
        self.listener: Listener | None = None
        n = settings.node.listeners
        self._shared = self._ctx.Array("i", n, lock=False) if n > 1 else None
        self._procs: list[Any] = []
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        init_db(self.settings.database.url)
        # Before any writer starts (only this process does it): temp files swept, objects left
        # without an index row by a crash indexed or quarantined.
        ingest = make_ingest(self.settings, self.engine)
        reconcile(ingest)
        n = self.settings.node.listeners
        if n == 1:
            waker = None
            if self.monitor is not None:
                waker = CompletionWaker(self.monitor.wake, self._every_instance)
            self.listener = Listener(self.settings, ingest, wake_completion=waker)
            self.listener.start()
        else:
            ingest.close()  # the listener processes have their own
            if self.monitor is not None:
                monitor = self.monitor
                self._monitor_wakeup = Wakeup(
                    self.engine, [], channel=COMPLETION, on_wake=lambda _name: monitor.wake(), label="completion"
                ).start()
            for slot in range(n):
                self._procs.append(self._spawn(slot))
            self._supervisor = threading.Thread(target=self._supervise, name="listener-supervisor", daemon=True)
            self._supervisor.start()
        if self.monitor is not None:
            self.monitor.start()
        log.info(
            "node started",
            extra=kv(
                ae_title=self.settings.node.ae_title,
                port=self.port,
                tls_port=self.settings.node.tls_port or 0,
                listeners=n,
                storage=self.settings.storage.path,
                database=self.engine.url.render_as_string(hide_password=True),
            ),
        )

    def _spawn(self, slot: int) -> Any:
        ready = self._ctx.Event()
        p = self._ctx.Process(
            target=_listener_process,
            args=(self.settings, slot, self._shared, ready, self._every_instance),
            name=f"listener-{slot}",
        )
        p.start()
        if not ready.wait(60):
            log.error("listener process did not start", extra=kv(slot=slot))
        return p

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            for slot, p in enumerate(self._procs):
                if not p.is_alive() and not self._stopping.is_set():
                    log.error("listener process exited; restarting", extra=kv(slot=slot, exitcode=p.exitcode))
                    if self._shared is not None:
                        self._shared[slot] = 0
                    self._procs[slot] = self._spawn(slot)

    @property
    def port(self) -> int:
        if self.listener is not None:
            return self.listener.port
        return self.settings.node.port

    def active_associations(self) -> int:
        if self.listener is not None:
            return self.listener.active.count
        return sum(self._shared) if self._shared is not None else 0

    def stop(self, grace_seconds: float = 10.0) -> None:
        self._stopping.set()
        if self.listener is not None:
            self.listener.stop(grace_seconds)
            self.listener.ingest.close()
            self.listener = None
        for p in self._procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the process finishes its associations and exits
        deadline = time.monotonic() + grace_seconds + 5
        for p in self._procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        self._procs.clear()
        if self._monitor_wakeup is not None:
            self._monitor_wakeup.stop()
            self._monitor_wakeup = None
        if self.monitor is not None:
            self.monitor.stop()
        self.engine.dispose()
        log.info("node stopped")
