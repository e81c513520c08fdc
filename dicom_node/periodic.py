"""A daemon thread that calls a function every N seconds until stopped (monitors, sweepers)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any


class Periodic:
    def __init__(self, name: str, fn: Callable[[], Any], interval: Callable[[], float], log: logging.Logger) -> None:
        self.name = name
        self.fn = fn
        self.interval = interval  # read each round, so settings changed in tests take effect
        self.log = log
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Start the next round now instead of at the end of the interval."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fn()
            except Exception:  # a failed round is logged; the next one runs anyway
                self.log.exception("%s round failed", self.name)
            self._wake.wait(self.interval())
            self._wake.clear()
