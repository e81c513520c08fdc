"""Structured key=value logging without patient data.

Log calls pass facts as `extra={"kv": {...}}`; the formatter renders them as key=value pairs
after the message. Patient identifiers (PatientID, names, birth dates) are never passed to the
logger unless `[node] log_phi = true`; instances are named by their internal id and a hash prefix.
"""

from __future__ import annotations

import logging
import os
import sys
import time
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
            parts.append(f"exc={_fmt_value(self.formatException(record.exc_info))}")
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
