"""CLI pieces for jobs: `unimedvl worker`, `unimedvl jobs` and the job part of `unimedvl status`.

Wire into the main app with ``register(app)``. The job re-queue for `unimedvl retry` is
``dicom_node.jobs.admin.retry_jobs`` (merged with the outbox retry by the main CLI).
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

from dicom_node.jobs.models import DONE, FAILED, PLANNED, QUEUED, RUNNING

DEFAULT_CONFIG = Path("unimedvl.toml")


def _settings(config: Path | None) -> Any:
    from dicom_node.config import ConfigError, load_config

    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def print_jobs_status(engine: Engine, console: Console | None = None, settings: Any = None) -> int:
    """Jobs per state, latest failures and series that matched no rule. Returns the failed count."""
    from dicom_node.jobs.admin import jobs_status

    console = console or Console()
    data = jobs_status(engine)
    table = Table(title="Jobs (model tasks)")
    for state in (PLANNED, QUEUED, RUNNING, DONE, FAILED):
        table.add_column(state, justify="right", overflow="fold")  # wrap on narrow terminals, never cut
    table.add_column("outputs", justify="right", overflow="fold")
    table.add_row(*[str(data["counts"][s]) for s in (PLANNED, QUEUED, RUNNING, DONE, FAILED)], str(data["outputs"]))
    console.print(table)
    for e in data["last_errors"]:
        console.print(
            f"[red]job {e['id']} ({e['kind']}, {e['attempts']} attempt(s)) of study {e['study_instance_uid']} "
            f"failed:[/] {escape(e['error'] or '')}"
        )
    from dicom_node.jobs.stalls import stalls

    for reason in stalls(engine, settings):
        console.print(f"[red]stalled:[/] {escape(reason)}")
    for u in data["unmatched"]:
        console.print(
            f"[yellow]study {u['study_instance_uid']} revision {u['revision']}: "
            f"{len(u['unmatched_series'])} series matched no rule[/]"
        )
    return data["counts"][FAILED]


def register(app: typer.Typer) -> None:
    @app.command()
    def worker(
        config: Path | None = typer.Option(None, "--config", "-c", help="config file (default ./unimedvl.toml)"),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (pins GPU N)"),
        queue: list[str] = typer.Option(
            [], "--queue", "-Q", help="understanding, generation or a task kind (repeatable; default both)"
        ),
        concurrency: int = typer.Option(1, "--concurrency", min=1, help="pool processes; keep 1 per GPU"),
        loglevel: str = typer.Option("INFO", "--loglevel"),
    ) -> None:
        """Run a GPU worker: a Celery worker that loads the model once and runs jobs from the broker."""
        import logging

        from dicom_node.jobs.worker import run_worker

        settings = _settings(config)
        logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run_worker(settings, device, queue or None, concurrency, loglevel=loglevel)

    @app.command()
    def jobs(
        config: Path | None = typer.Option(None, "--config", "-c", help="config file (default ./unimedvl.toml)"),
        state: str | None = typer.Option(None, "--state", help="planned, queued, running, done or failed"),
        limit: int = typer.Option(50, "--limit", min=1),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ) -> None:
        """List model jobs, newest first, with their state, attempts and failure reason."""
        from dicom_node.db import init_db, make_engine
        from dicom_node.jobs.admin import list_jobs

        settings = _settings(config)
        init_db(settings.database.url)
        engine = make_engine(settings.database.url)
        try:
            rows = list_jobs(engine, state=state, limit=limit)
        finally:
            engine.dispose()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        table = Table(title="Jobs")
        for c in ("id", "kind", "rule", "state", "attempts", "outputs", "worker", "error"):
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["kind"],
                escape(r["rule"]),
                r["state"],
                f"{r['attempts']}/{r['max_attempts']}",
                str(len(r["outputs"])),
                escape(r["worker"] or ""),
                escape(r["error"] or ""),
            )
        Console().print(table)
