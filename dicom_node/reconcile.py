"""Start-up reconciliation of storage with the index.

A crash between an object's rename into `objects/` and the commit of its index row leaves a
stored file without a row (the sender was never acknowledged and will resend; the copy we
have is still worth keeping). At start-up, before any listener runs: temp files of
interrupted writes are removed, each object file that no table references is indexed if it
is a complete, valid instance (the same checks as a received one) and otherwise moved to
`quarantine/` with a `.reason` file and a rejection-log row.

Only shard directories modified since shortly before the last write are scanned, so a large
archive is not walked at every start: every write creates and renames a file in `tmp/`, so
that folder's mtime (read before the sweep) is the time of the last write, and an object a crash
left without its row was renamed into its shard at that moment (MARGIN_SECONDS covers the
writes in flight beside it). Nothing is written beside the objects for this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from dicom_node.ingest import Ingest, Peer, Refused, record_rejection
from dicom_node.logs import kv

log = logging.getLogger("dicom_node.reconcile")

MARGIN_SECONDS = 300  # writes in flight at the crash, other writers' clocks, coarse mtimes
RECONCILE_PEER = Peer(calling_ae="", called_ae="", remote_ip="reconcile")


@dataclass
class Reconciled:
    temp_removed: int = 0
    scanned: int = 0
    indexed: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)


def _referenced(engine: Engine, candidates: list[str]) -> set[str]:
    """Which candidate relpaths any table references (every column whose name ends in relpath)."""
    found: set[str] = set()
    if not candidates:
        return found
    # One read-only connection for the catalogue and the queries (a second connection would wait
    # on the first's SQLite transaction).
    with engine.connect().execution_options(readonly=True) as conn:
        insp = inspect(conn)
        for table in insp.get_table_names():
            for col in insp.get_columns(table):
                name = col["name"]
                if not name.endswith("relpath"):
                    continue
                for i in range(0, len(candidates), 500):
                    chunk = candidates[i : i + 500]
                    params = {f"p{j}": v for j, v in enumerate(chunk)}
                    marks = ", ".join(f":p{j}" for j in range(len(chunk)))
                    # Table and column names come from the database's own catalogue, never from input.
                    rows = conn.execute(text(f'SELECT "{name}" FROM "{table}" WHERE "{name}" IN ({marks})'), params)
                    found.update(r[0] for r in rows)
    return found


def reconcile(ingest: Ingest) -> Reconciled:
    """Sweep temp files, index or quarantine unreferenced objects; see the module docstring."""
    storage = ingest.storage
    since = storage.tmp_dir.stat().st_mtime - MARGIN_SECONDS  # the last write, before the sweep
    result = Reconciled(temp_removed=storage.sweep_temp())
    candidates = storage.objects_since(since)
    result.scanned = len(candidates)
    known = _referenced(ingest.engine, candidates)
    for relpath in candidates:
        if relpath in known:
            continue
        try:
            ingest.adopt(relpath, RECONCILE_PEER)
            result.indexed.append(relpath)
        except Refused as exc:
            storage.quarantine(relpath, f"{exc.reason}: {exc.detail}")
            result.quarantined.append(relpath)
            record_rejection(
                ingest.engine,
                stage="reconcile",
                reason=exc.reason,
                detail=f"{relpath}: {exc.detail}",
                status=exc.status,
            )
        except OSError as exc:
            log.error("cannot reconcile object", extra=kv(relpath=relpath, error=type(exc).__name__))
    if result.temp_removed or result.indexed or result.quarantined:
        log.warning(
            "storage reconciled with the index",
            extra=kv(
                temp_removed=result.temp_removed,
                scanned=result.scanned,
                indexed=len(result.indexed),
                quarantined=len(result.quarantined),
            ),
        )
    return result
