"""Structured key=value logging without patient data.

Log calls pass facts as `extra={"kv": {...}}`; the formatter renders them as key=value pairs
after the message. Patient identifiers (PatientID, names, birth dates) are never passed to the
logger unless `[node] log_phi = true`; instances are named by their internal id and a hash prefix.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
from typing import Any

_QUOTE_NEEDED = set(' "=\t\n\r')


def _fmt_value(v: Any) -> str:
    s = str(v)
    if not s or any(c in _QUOTE_NEEDED for c in s):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'
    return s


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [
            f"ts={ts}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"pid={record.process}",
            f"msg={_fmt_value(record.getMessage())}",
        ]
        kv = getattr(record, "kv", None)
        if isinstance(kv, dict):
            parts.extend(f"{k}={_fmt_value(v)}" for k, v in kv.items())
        if record.exc_info:
            # exc_text first: the PHI guard puts a traceback without the exception's message there.
            parts.append(f"exc={_fmt_value(record.exc_text or self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once (level from UNIMEDVL_LOG_LEVEL, default INFO)."""
    level = (level or os.environ.get("UNIMEDVL_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if not any(getattr(h, "_unimedvl", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(KeyValueFormatter())
        handler._unimedvl = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU/DIMSE message at DEBUG/INFO: far too chatty for the hot path.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def kv(**fields: Any) -> dict[str, Any]:
    """`log.info("msg", extra=kv(a=1))` shorthand."""
    return {"kv": fields}


# Libraries whose log lines and warnings can quote a dataset's values (pydicom: "Invalid value
# for VR PN: 'Doe^John'"; highdicom: a rejected attribute value): their text is withheld.
_LIBRARY_LOGGERS = ("pydicom", "highdicom", "py.warnings")
# Warnings from these packages keep their text: they never handle a dataset's values.
_NO_DATASET_LIBRARIES = ("celery", "kombu", "billiard", "amqp", "sqlalchemy", "alembic", "uvicorn", "fastapi")
_WARNING_WHERE = re.compile(r"^(?P<where>.*?:\d+): (?P<category>\w+): ")
_guard_installed = False


def _library(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _LIBRARY_LOGGERS)


def _withhold(record: logging.LogRecord) -> None:
    where: str | None = ""
    if record.name == "py.warnings":
        m = _WARNING_WHERE.match(record.getMessage())
        if m and any(f"/{lib}/" in m.group("where") for lib in _NO_DATASET_LIBRARIES):
            where = None  # the worker's plumbing (Celery ...) never sees a dataset: keep its text
        elif m:
            where = f" {m.group('category')} at {m.group('where')}"
    if _library(record.name) and where is not None:
        record.msg = (
            f"{record.name} {record.levelname.lower()}{where}: text withheld (it may quote patient data; "
            "set node.log_phi = true to see it)"
        )
        record.args = None
    if record.exc_info and record.exc_info[0] is not None:
        etype, _, tb = record.exc_info
        # The stack (code locations) stays; the message, which can quote values, does not.
        record.exc_text = (
            "Traceback (most recent call last):\n"
            + "".join(traceback.format_tb(tb))
            + f"{etype.__module__}.{etype.__qualname__}: (message withheld: log_phi is off)"
        )


def guard_phi(log_phi: bool) -> None:
    """With `log_phi` off, keep patient data out of every log line of this process and its forks:
    library log lines and Python warnings (routed to logging) lose their text, exception messages
    are dropped from tracebacks. Installed as the log record factory, so it holds whatever
    handlers Celery or uvicorn set up later. Idempotent; a no-op with `log_phi` on."""
    global _guard_installed
    if log_phi or _guard_installed:
        return
    logging.captureWarnings(True)
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        _withhold(record)
        return record

    logging.setLogRecordFactory(factory)
    _guard_installed = True
