"""Wake the exporter when a commit makes work for it, instead of waiting for its next poll.

Whoever inserts outbox rows calls `notify(session, destinations)` inside the inserting
transaction:
- on PostgreSQL that issues ``pg_notify('unimedvl_outbox', <destination>)``, which the server
  delivers only when (and if) the transaction commits, to every exporter process LISTENing;
- in the same process (any database, SQLite included) an ``after_commit`` hook on the session
  sets the waiting exporter's event.

- on SQLite (one host by nature) the after-commit hook of any process also sends a datagram to
  the exporter's Unix socket in the abstract namespace, named after the database file (Linux;
  nothing is created on disk, and a commit with no exporter listening costs one failed sendto).

The exporter's poll (`[export] poll_seconds`) stays the safety net everywhere (a listener
connection that drops, a notification lost in a reconnect, a second exporter on the same file).

The same transport serves other channels: `COMPLETION` wakes the completion monitor (in the
node's supervisor process) from its listener processes (`announce`, sent after their commit).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

log = logging.getLogger(__name__)

CHANNEL = "unimedvl_outbox"
COMPLETION = "unimedvl_completion"  # listener processes -> the completion monitor
ALL = "*"  # payload: wake every destination (re-queued rows of several destinations)
_INFO_KEY = "unimedvl_outbox_wake"
_HOOKED = "unimedvl_outbox_hooked"
_ADDRESS = "unimedvl_outbox_address"


def sqlite_address(engine: Engine, channel: str = CHANNEL) -> str | None:
    """Abstract Unix socket name for `channel` on an SQLite database file (None: not a file
    database, not Linux)."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    if not sys.platform.startswith("linux"):  # abstract socket names are Linux only: poll elsewhere
        return None
    from pathlib import Path

    key = hashlib.sha256(str(Path(url.database).resolve()).encode()).hexdigest()[:24]
    if channel == CHANNEL:  # the name exporters of earlier releases bind
        return f"\0unimedvl-outbox-{key}"
    return f"\0{channel.replace('_', '-')}-{key}"


def _send_datagram(address: str, names: Iterable[str]) -> None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(names).encode(), address)
    except OSError:  # nobody listening (no exporter running on this file), or its buffer is full
        pass


_waiters: set[Wakeup] = set()  # outbox (CHANNEL) waiters of this process, for wake_local
_waiters_lock = threading.Lock()


def announce(engine: Engine, channel: str, payload: str = ALL) -> None:
    """Wake `channel`'s listeners in other processes now (call it after the commit it announces).

    PostgreSQL: one autocommit ``pg_notify`` (a round trip on `engine`'s pool); SQLite: a datagram
    to the channel's abstract socket (lost, harmlessly, when nobody listens). Errors are logged,
    never raised: the listener's poll is the safety net."""
    if engine.dialect.name == "postgresql":
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload})
                conn.commit()
        except Exception as exc:
            log.warning("wake-up notification on %s failed (%s); the poll will find it", channel, type(exc).__name__)
        return
    address = sqlite_address(engine, channel)
    if address:
        _send_datagram(address, [payload])


def notify(session: Session, destinations: Iterable[str]) -> None:
    """Announce new due rows for `destinations`; delivered when `session` commits."""
    names = sorted(set(destinations))
    if not names:
        return
    if session.get_bind().dialect.name == "postgresql":
        for name in names:  # PostgreSQL folds identical notifications of one transaction into one
            session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": name})
    if not session.info.get(_HOOKED):  # sessions are short-lived: the hooks stay with it
        session.info[_HOOKED] = True
        session.info[_ADDRESS] = sqlite_address(session.get_bind())  # type: ignore[arg-type]
        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_rollback", _after_rollback)
    session.info.setdefault(_INFO_KEY, set()).update(names)


def _after_commit(session: Any) -> None:
    names = session.info.pop(_INFO_KEY, None)
    if not names:
        return
    wake_local(names)
    address = session.info.get(_ADDRESS)
    if address:
        _send_datagram(address, names)


def _after_rollback(session: Any) -> None:
    session.info.pop(_INFO_KEY, None)


def wake_local(names: Iterable[str]) -> None:
    """Wake this process's exporters for `names` (ALL: every destination)."""
    with _waiters_lock:
        waiters = list(_waiters)
    for w in waiters:
        for name in names:
            w.wake(None if name == ALL else name)


class Wakeup:
    """One event per destination, set by a local commit or a PostgreSQL notification.

    `wait(name, timeout)` returns True when woken, False when the timeout (the poll) ran out.
    `on_wake` (optional) is called with each name woken (None: all), for a waiter that has its
    own event (the completion monitor). `channel` selects the notification channel / socket.
    """

    def __init__(
        self,
        engine: Engine,
        destinations: Iterable[str],
        *,
        channel: str = CHANNEL,
        on_wake: Callable[[str | None], None] | None = None,
        label: str = "exporter: outbox",
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.on_wake = on_wake
        self.label = label  # names the waiter in log lines
        self._events = {name: threading.Event() for name in destinations}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()  # set while the LISTEN connection / wake socket is up
        self.backend_pid: int | None = None  # the LISTEN connection's server process (PostgreSQL)
        self.reconnects = 0  # LISTEN connections re-established after a loss

    def start(self) -> Wakeup:
        if self.channel == CHANNEL:
            with _waiters_lock:
                _waiters.add(self)
        wanted = bool(self._events) or self.on_wake is not None
        if self.engine.dialect.name == "postgresql" and wanted:
            self._thread = threading.Thread(target=self._listen, name=f"{self.channel}-listen", daemon=True)
            self._thread.start()
        address = sqlite_address(self.engine, self.channel)
        if address and wanted:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind(address)
            except OSError as exc:  # another waiter on this database holds it: poll only
                sock.close()
                log.info("%s: wake-up socket in use (%s); polling instead", self.label, exc.strerror)
            else:
                sock.settimeout(0.5)
                self._thread = threading.Thread(
                    target=self._receive, args=(sock,), name=f"{self.channel}-wake", daemon=True
                )
                self._thread.start()
        return self

    def stop(self) -> None:
        with _waiters_lock:
            _waiters.discard(self)
        self._stop.set()
        self.wake(None)
        if self._thread is not None:
            self._thread.join(5)

    def wake(self, name: str | None) -> None:
        if name is None:
            for ev in self._events.values():
                ev.set()
        elif name in self._events:
            self._events[name].set()
        if self.on_wake is not None and not self._stop.is_set():
            self.on_wake(name)

    def wait(self, name: str, timeout: float) -> bool:
        ev = self._events[name]
        woke = ev.wait(timeout)
        ev.clear()  # rows committed before this point are found by the round that follows
        return woke

    def _receive(self, sock: socket.socket) -> None:
        self.listening.set()
        with sock:
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    log.exception("%s: wake-up socket failed; polling instead", self.label)
                    break
                for name in data.decode(errors="replace").split("\n"):
                    self.wake(None if name == ALL else name)
        self.listening.clear()

    def _listen(self) -> None:
        """LISTEN on the channel; on a lost connection reconnect with backoff (0.5 s doubling to
        30 s). One warning when it is lost and one line when it is back, whatever the attempts."""
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        delay = 0.5
        lost_at: float | None = None
        while not self._stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    self.backend_pid = conn.info.backend_pid
                    self.listening.set()
                    if lost_at is not None:
                        self.reconnects += 1
                        down = time.monotonic() - lost_at
                        log.info("%s LISTEN connection back after %.1f s", self.label, down)
                        lost_at = None
                    delay = 0.5
                    self.wake(None)  # anything committed while we were not listening
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            self.wake(None if n.payload == ALL else n.payload)
            except Exception as exc:
                self.listening.clear()
                self.backend_pid = None
                if self._stop.is_set():
                    break
                if lost_at is None:
                    lost_at = time.monotonic()
                    why = type(exc).__name__
                    log.warning("%s LISTEN connection lost (%s); polling until it is back", self.label, why)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        self.listening.clear()
