"""CLI pieces for the outbox: `unimedvl retry` and the outbox part of `unimedvl status`.

Wire into the main app with ``register(app)``; ``print_outbox_status(engine, console)``
renders the outbox table for a status command that shows more than the outbox.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.engine import Engine

from dicom_node.export.models import DONE, FAILED, PENDING, SENDING, SUPERSEDED
from dicom_node.export.outbox import requeue, summary

DEFAULT_CONFIG = Path("unimedvl.toml")


def _settings(config: Path | None) -> Any:
    from dicom_node.config import load_config

    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    return load_config(path)


def _engine(config: Path | None) -> Engine:
    from dicom_node.db import make_engine

    return make_engine(_settings(config).database.url)


def outbox_status_data(engine: Engine, *, last_errors: int = 5) -> list[dict[str, Any]]:
    """JSON-friendly outbox summary per destination (also used by the status API)."""
    return [
        {
            "destination": s.destination,
            "counts": s.counts,
            "failed": s.failed,
            "last_errors": [
                {"id": i, "sop_class_uid": c, "last_status": st, "last_error": e} for i, c, st, e in s.last_errors
            ],
        }
        for s in summary(engine, last_errors=last_errors)
    ]


def print_outbox_status(engine: Engine, console: Console | None = None, *, last_errors: int = 5) -> int:
    """Render pending/sending/done/failed per destination and the latest failures. Returns failed count."""
    console = console or Console()
    data = summary(engine, last_errors=last_errors)
    table = Table(title="Outbox (result objects to PACS)")
    table.add_column("destination", overflow="fold")
    for state in (PENDING, SENDING, DONE, FAILED, SUPERSEDED):
        table.add_column(state, justify="right", overflow="fold")  # wrap on narrow terminals, never cut
    for s in data:
        table.add_row(s.destination, *(str(s.counts.get(k, 0)) for k in (PENDING, SENDING, DONE, FAILED, SUPERSEDED)))
    if not data:
        console.print("Outbox: empty")
    else:
        console.print(table)
    failed_total = 0
    for s in data:
        failed_total += s.failed
        for row_id, sop_class, _status, error in s.last_errors:
            # The message names the DICOM status (hex) or HTTP code itself; a bare int would be ambiguous.
            where = f"#{row_id} -> {escape(s.destination)} ({sop_class})"
            console.print(f"  [red]failed[/red] {where}: {escape(error or '')}")
    if failed_total:
        console.print("  re-queue with: unimedvl retry --all-failed  (or: unimedvl retry ID ...)")
    return failed_total


def retry(
    ids: list[int] | None = typer.Argument(None, help="outbox row ids to re-queue (see unimedvl status)"),
    all_failed: bool = typer.Option(False, "--all-failed", help="re-queue every failed row"),
    destination: str | None = typer.Option(None, "--destination", help="only rows for this destination"),
    config: Path | None = typer.Option(None, "--config", help="config file (default ./unimedvl.toml if present)"),
) -> None:
    """Re-queue failed deliveries (attempts reset; the exporter sends them on its next round)."""
    if not ids and not all_failed:
        typer.echo("give outbox row ids, or --all-failed", err=True)
        raise typer.Exit(2)
    engine = _engine(config)
    done = requeue(engine, ids=ids or (), all_failed=all_failed, destination=destination)
    if ids:
        skipped = sorted(set(ids) - set(done))
        if skipped:
            typer.echo(f"not re-queued (not failed, or unknown): {', '.join(map(str, skipped))}", err=True)
    typer.echo(f"re-queued {len(done)} row(s)" + (f": {', '.join(map(str, done))}" if done else ""))


def outbox_status(
    config: Path | None = typer.Option(None, "--config", help="config file (default ./unimedvl.toml if present)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Outbox per destination: pending, sending, done, failed (with the latest errors)."""
    engine = _engine(config)
    if as_json:
        typer.echo(json.dumps(outbox_status_data(engine), indent=2))
        return
    print_outbox_status(engine)


def register(app: typer.Typer, *, status_name: str | None = None) -> None:
    """Add `retry` to the app; also the outbox status as `status_name` (e.g. "outbox") if given."""
    app.command("retry")(retry)
    if status_name:
        app.command(status_name)(outbox_status)
