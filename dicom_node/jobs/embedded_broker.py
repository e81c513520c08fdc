"""The embedded broker: kombu's SQLAlchemy transport, woken by a publish instead of a poll.

kombu's virtual transports sleep `polling_interval` (1 s by default) after every empty poll,
and with acks_late + prefetch 1 a worker pays that wait once per job. This subclass
- rings a bell after each publish commits: a datagram to the Linux abstract Unix sockets
  `unimedvl-broker-<hash of the broker database>-<slot>` (slots 0..7, one per consuming
  process; a publish with nobody listening costs 8 failed sendto calls);
- waits on its own bell instead of sleeping between polls, so a job published on an idle
  queue is fetched at once, and a worker's ack rings its own bell (with prefetch 1 it skips
  the queue while busy); the poll (0.1 s) stays the safety net (a ninth worker on one broker
  file, other systems than Linux).
The sqlalchemy transport cannot take the interval as a transport option (it hands every option
to `create_engine`), so it is a class attribute here. kombu's tables are used unchanged;
`sqla+` URLs are mapped to this transport by `embedded_url`.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from queue import Empty
from time import monotonic, sleep
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Channel as SQLAlchemyChannel
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport

ALIAS = "unimedvl-sqla"
# Idle cost, measured (a consumer on the worker's three queues, 2-core machine at load ~2):
# 0.1 s -> 8 % of one core, 0.05 s -> 16 %, 1 s -> <1 %. With the bell a published job does
# not wait for the poll, so 0.1 s only bounds the safety net. RabbitMQ pushes anyway.
POLLING_INTERVAL_S = 0.1
BELL_SLOTS = 8


def bell_names(db_url: str) -> list[str] | None:
    """The abstract socket names of a broker database (None off Linux: poll only)."""
    if not sys.platform.startswith("linux"):
        return None
    key = hashlib.sha256(db_url.encode()).hexdigest()[:24]
    return [f"\0unimedvl-broker-{key}-{i}" for i in range(BELL_SLOTS)]


def ring(db_url: str) -> None:
    names = bell_names(db_url)
    if not names:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for name in names:
            try:
                sock.sendto(b"1", name)
            except OSError:  # no consumer on this slot, or its buffer is full (it is awake anyway)
                pass


class Channel(SQLAlchemyChannel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        super()._put(queue, payload, **kwargs)  # committed: a consumer can see it now
        ring(self.connection.client.hostname or "")

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        """With prefetch 1 a busy consumer skips the queue; its ack frees it to take the next
        message now, so it rings its own bell (a publish rung while it was busy is gone)."""
        super().basic_ack(delivery_tag, multiple)
        bell = self.connection._bell
        if bell is not None:
            try:
                bell.sendto(b"1", bell.getsockname())
            except OSError:
                pass


class Transport(SQLAlchemyTransport):
    Channel = Channel
    polling_interval = POLLING_INTERVAL_S

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._bell: socket.socket | None = None
        self._bell_tried = False

    def _bell_socket(self) -> socket.socket | None:
        if not self._bell_tried:
            self._bell_tried = True
            for name in bell_names(self.client.hostname or "") or []:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    sock.bind(name)
                except OSError:
                    sock.close()
                    continue
                self._bell = sock
                break
        return self._bell

    def _wait(self, seconds: float) -> None:
        bell = self._bell_socket()
        if bell is None:
            sleep(seconds)
            return
        bell.settimeout(seconds)
        try:
            bell.recv(64)
            bell.setblocking(False)
            while True:  # several publishes rang: one wake-up is enough
                bell.recv(64)
        except (TimeoutError, BlockingIOError):
            pass

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """kombu's virtual Transport.drain_events, waiting on the bell instead of sleeping."""
        time_start = monotonic()
        get = self.cycle.get
        polling_interval = self.polling_interval
        if timeout and polling_interval and polling_interval > timeout:
            polling_interval = timeout
        while True:
            try:
                get(self._deliver, timeout=timeout)
            except Empty:
                if timeout is not None and monotonic() - time_start >= timeout:
                    raise TimeoutError() from None
                if polling_interval is not None:
                    self._wait(polling_interval)
            else:
                break

    def close_connection(self, connection: Any) -> None:
        if self._bell is not None:
            self._bell.close()
            self._bell, self._bell_tried = None, False
        super().close_connection(connection)


TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")


def embedded_url(url: str) -> str:
    """`sqla+sqlite:///…` -> the same database through this transport; other URLs unchanged."""
    for prefix in ("sqla+", "sqlalchemy+"):
        if url.startswith(prefix):
            return f"{ALIAS}+{url[len(prefix) :]}"
    return url
