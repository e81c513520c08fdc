"""Wake the exporter when a commit makes work for it, instead of waiting for its next poll.

Whoever inserts outbox rows calls `notify(session, destinations)` inside the inserting
transaction:
- on PostgreSQL that issues ``pg_notify('unimedvl_outbox', <destination>)``, which the server
  delivers only when (and if) the transaction commits, to every exporter process LISTENing;
- in the same process (any database, SQLite included) an ``after_commit`` hook on the session
  sets the waiting exporter's event.

A worker in another process on SQLite cannot reach the exporter this way: there the exporter's
poll (`[export] poll_seconds`) still finds the rows, and it stays the safety net everywhere
(a listener connection that drops, a notification lost in a reconnect).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

log = logging.getLogger(__name__)

CHANNEL = "unimedvl_outbox"
ALL = "*"  # payload: wake every destination (re-queued rows of several destinations)
_INFO_KEY = "unimedvl_outbox_wake"
_HOOKED = "unimedvl_outbox_hooked"

_waiters: set[Wakeup] = set()
_waiters_lock = threading.Lock()


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
        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_rollback", _after_rollback)
    session.info.setdefault(_INFO_KEY, set()).update(names)


def _after_commit(session: Any) -> None:
    wake_local(session.info.pop(_INFO_KEY, None) or ())


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
    """

    def __init__(self, engine: Engine, destinations: Iterable[str]) -> None:
        self.engine = engine
        self._events = {name: threading.Event() for name in destinations}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()  # set while the PostgreSQL LISTEN connection is up

    def start(self) -> Wakeup:
        with _waiters_lock:
            _waiters.add(self)
        if self.engine.dialect.name == "postgresql" and self._events:
            self._thread = threading.Thread(target=self._listen, name="export-listen", daemon=True)
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

    def wait(self, name: str, timeout: float) -> bool:
        ev = self._events[name]
        woke = ev.wait(timeout)
        ev.clear()  # rows committed before this point are found by the round that follows
        return woke

    def _listen(self) -> None:
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    delay = 0.5
                    self.wake(None)  # anything committed while we were not listening
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            self.wake(None if n.payload == ALL else n.payload)
            except Exception as exc:
                self.listening.clear()
                if self._stop.is_set():
                    break
                why = type(exc).__name__
                log.warning("exporter: outbox LISTEN connection lost (%s); polling until it is back", why)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        self.listening.clear()
