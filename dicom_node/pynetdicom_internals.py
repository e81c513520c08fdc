"""The one place that touches a private pynetdicom name, checked against the installed version.

pynetdicom 3.0.4 pauses an association's own reactor thread around each `send_c_store()` with a
flag/Event pair (`Association._reactor_checkpoint`, `_is_paused`) that can race: under CPU
load the reactor slips past its checkpoint, takes the C-STORE response off the DIMSE queue
("Received unexpected C-STORE service message") and the sender waits out the DIMSE timeout
(docs/upstream/pynetdicom.md). A requestor that only sends needs nothing from that reactor
(an abort still reaches `send_c_store` through the DUL, which puts (None, None) on the
queue), so the exporter keeps it parked while it drives the association
(`ParkedCheckpoint`), and releases it before A-RELEASE.

Nothing happens on import. `check_internals()` says whether the installed pynetdicom still has
the internals this relies on; `ParkedCheckpoint.install` parks only when it does, and otherwise
logs once and leaves pynetdicom's own pausing alone (the race comes back, nothing breaks).
tests/node/test_public_api.py fails on a pynetdicom whose internals differ, and fails if any
other module of the node uses a private pynetdicom name.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

log = logging.getLogger(__name__)

CHECKPOINT = "_reactor_checkpoint"


def check_internals(association_class: type = Association) -> list[str]:
    """What the installed pynetdicom lacks for `ParkedCheckpoint` (empty: all present).

    Checked: a new requestor Association has an Event named `_reactor_checkpoint`; its reactor
    loop waits on it; `send_c_store` clears and sets it around the exchange.
    """
    problems: list[str] = []
    try:
        assoc = association_class(AE(), "requestor")
    except Exception as exc:  # a changed constructor is a changed internal
        return [f"Association(AE(), 'requestor') failed: {type(exc).__name__}"]
    if not isinstance(getattr(assoc, CHECKPOINT, None), threading.Event):
        problems.append(f"Association has no threading.Event {CHECKPOINT}")
    for method, needles in (
        ("_run_reactor", (f"self.{CHECKPOINT}.wait()",)),
        ("send_c_store", (f"self.{CHECKPOINT}.clear()", f"self.{CHECKPOINT}.set()")),
    ):
        try:
            source = inspect.getsource(getattr(association_class, method))
        except (AttributeError, OSError, TypeError):
            problems.append(f"Association.{method} source not found")
            continue
        problems += [f"Association.{method} no longer calls {n}" for n in needles if n not in source]
    return problems


@functools.cache
def internals_ok() -> bool:
    """`check_internals()` on the installed pynetdicom, once per process, logged when it fails."""
    problems = check_internals()
    if problems:
        log.warning(
            "pynetdicom internals differ from the tested version (%s): exporter reactors not parked",
            "; ".join(problems),
        )
    return not problems


class ParkedCheckpoint(threading.Event):
    """Keeps a requestor association's reactor thread parked while one sender drives it."""

    def __init__(self) -> None:
        super().__init__()
        self.held = True
        self.parked = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.parked.set()  # only the reactor thread waits on the checkpoint
        return super().wait(timeout)

    def set(self) -> None:
        if not self.held:
            super().set()

    @classmethod
    def install(cls, assoc: Any, *, ok: bool | None = None) -> ParkedCheckpoint | None:
        """Park `assoc`'s reactor (None when the installed pynetdicom cannot be parked safely)."""
        if not (internals_ok() if ok is None else ok):
            return None
        cp = cls()
        setattr(assoc, CHECKPOINT, cp)
        # Wait until the reactor sits in *our* checkpoint; only then is no response stolen.
        if not cp.parked.wait(timeout=5.0):
            log.warning("association reactor did not park within 5 s")
        return cp

    def release(self) -> None:
        self.held = False
        super().set()
