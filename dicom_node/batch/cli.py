"""`unimedvl batch SOURCE --out DIR ...` and `unimedvl batch status [ID]` (wired by ``register(app)``)."""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger("dicom_node.batch.cli")


def _task_rule(
    tasks: list[str], prompt: str | None, questions: list[str], slices: str, max_new_tokens: int | None
) -> list[dict[str, Any]]:
    """`--task report --task vqa --question ...` -> one rule matching every series."""
    specs = []
    for kind in tasks:
        spec: dict[str, Any] = {"kind": kind, "slices": slices}
        if prompt and kind != "vqa":
            spec["prompt"] = prompt
        if kind == "vqa":
            spec["questions"] = questions or ["Is there an abnormality?"]
        if max_new_tokens:
            spec["max_new_tokens"] = max_new_tokens
        specs.append(spec)
    return [{"name": "batch", "match": {}, "tasks": specs}]


def _rules_file(path: Path) -> list[dict[str, Any]]:
    import tomllib

    from dicom_node.routing import parse_rules

    try:
        raw = tomllib.loads(path.read_text()).get("rules")
        if not raw:
            raise ValueError("no [[rules]] table")
        parse_rules(raw)
    except (OSError, ValueError) as exc:
        typer.echo(f"--rules {path}: {exc}", err=True)
        raise typer.Exit(2) from None
    return raw


def _print_status(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    c = Console()
    t = Table(title=f"Batch {data['id']} ({data['source_kind']}, {data['state']})")
    for k in ("pending", "queued", "fetching", "running", "done", "failed", "skipped"):
        t.add_column(k, justify="right")
    t.add_column("studies/h", justify="right")
    t.add_column("ETA", justify="right")
    eta = data["eta_seconds"]
    t.add_row(
        *[str(data["counts"][k]) for k in ("pending", "queued", "fetching", "running", "done", "failed", "skipped")],
        str(data["items_per_hour"] or "-"),
        f"{eta:.0f} s" if eta is not None else "-",
    )
    c.print(t)
    for f in data["failures"]:
        c.print(f"[red]item {f['item']} failed after {f['attempts']} attempt(s):[/] {escape(f['reason'] or '')}")
    for f in data["task_failures"]:
        c.print(f"[yellow]item {f['item']} task {f['task']} failed:[/] {escape(f['reason'] or '')}")


def register(app: typer.Typer) -> None:
    @app.command()
    def batch(
        source: str = typer.Argument(
            None, help="folder, DICOMDIR, dimse://AET@host:port, http(s):// DICOMweb URL, UID list; or `status`"
        ),
        batch_id: int | None = typer.Argument(None, help="with `status`: the batch id (default: the latest)"),
        out: Path | None = typer.Option(None, "--out", help="output folder: DICOM objects + results.parquet/.csv"),
        task: list[str] = typer.Option([], "--task", help="task kind (repeatable); default: the config's [[rules]]"),
        prompt: str | None = typer.Option(None, "--prompt"),
        question: list[str] = typer.Option([], "--question", help="VQA question (repeatable)"),
        slices: str = typer.Option("middle", "--slices", help="all | middle | key:N | every:K"),
        max_new_tokens: int | None = typer.Option(None, "--max-new-tokens"),
        rules: Path | None = typer.Option(None, "--rules", help="a TOML file with [[rules]]"),
        deidentify: bool | None = typer.Option(
            None, "--deidentify/--no-deidentify", help="default: on for PACS sources"
        ),
        retain_dates: bool = typer.Option(False, "--retain-dates", help="keep dates, shifted (longitudinal option)"),
        retain_characteristics: bool = typer.Option(False, "--retain-patient-characteristics"),
        clean_descriptors: bool = typer.Option(False, "--clean-descriptors"),
        retain_uids: bool = typer.Option(False, "--retain-uids"),
        allow_burned_in: bool = typer.Option(False, "--allow-burned-in"),
        mapping_key: Path | None = typer.Option(None, "--mapping-key", help="write original->pseudonym CSV here"),
        resume: int | None = typer.Option(None, "--resume", help="continue batch ID"),
        query: list[str] = typer.Option([], "--query", help="C-FIND/QIDO filter KEYWORD=VALUE (repeatable)"),
        fetch_from: str | None = typer.Option(None, "--fetch-from", help="PACS to fetch a UID list from"),
        retrieve: str = typer.Option("get", "--retrieve", help="DIMSE retrieval: get | move"),
        move_port: int = typer.Option(0, "--move-port", help="C-MOVE: port of our storage SCP"),
        max_fetch: int = typer.Option(2, "--max-fetch", help="concurrent retrievals per source"),
        workers: int | None = typer.Option(
            None, "--workers", help="embedded workers (default 1 on the embedded broker, 0 on RabbitMQ)"
        ),
        window: int = typer.Option(4, "--window", help="items in flight at most"),
        retry_backoff: float = typer.Option(
            1.0, "--retry-backoff", help="seconds before a retry, doubling per attempt"
        ),
        scratch: Path | None = typer.Option(None, "--scratch", help="where workers fetch studies (default: temp)"),
        lease_seconds: float = typer.Option(60.0, "--lease-seconds", help="a worker silent this long loses its item"),
        max_attempts: int = typer.Option(3, "--max-attempts", help="tries per study before it ends failed"),
        dry_run: bool = typer.Option(False, "--dry-run", help="list and estimate; run nothing"),
        json_progress: bool = typer.Option(False, "--json-progress", help="JSON lines instead of a progress bar"),
        config: Path | None = typer.Option(None, "--config", "-c"),
    ) -> None:
        """Research batch over a folder, DICOMDIR or PACS: de-identified, resumable, on the workers."""
        from dicom_node.jobs.cli import _settings

        settings = _settings(config)
        if source == "status":
            raise typer.Exit(_status(settings, batch_id))
        from dicom_node.batch.deidentify import DeidOptions
        from dicom_node.batch.driver import BatchError, BatchRequest
        from dicom_node.batch.sources import SourceError, parse_query

        if resume is None and (source is None or out is None):
            typer.echo("usage: unimedvl batch SOURCE --out DIR [...] | --resume ID | status [ID]", err=True)
            raise typer.Exit(2)
        if task:
            from typing import get_args

            from dicom_node.routing import TaskKind

            TASK_KINDS = get_args(TaskKind)
            bad = [t for t in task if t not in TASK_KINDS]
            if bad:
                typer.echo(f"--task {bad[0]!r}: expected one of {', '.join(TASK_KINDS)}", err=True)
                raise typer.Exit(2)
        try:
            raw_rules = (
                _task_rule(task, prompt, question, slices, max_new_tokens)
                if task
                else (_rules_file(rules) if rules else None)
            )
            if raw_rules is None:
                from dicom_node.routing import DEFAULT_RULES

                raw_rules = settings.rules if settings.rules is not None else DEFAULT_RULES
            pacs = (source or "").startswith(("dimse://", "http://", "https://")) or bool(fetch_from)
            req = BatchRequest(
                source=str(Path(source).resolve()) if source and Path(source).exists() else (source or ""),
                out_dir=(out or Path(".")).resolve(),
                rules=raw_rules,
                deidentify=DeidOptions(
                    enabled=pacs if deidentify is None else deidentify,
                    retain_longitudinal=retain_dates,
                    retain_patient_characteristics=retain_characteristics,
                    clean_descriptors=clean_descriptors,
                    retain_uids=retain_uids,
                    allow_burned_in=allow_burned_in,
                ),
                query=parse_query(query),
                fetch_from=fetch_from,
                retrieve=retrieve,
                move_port=move_port,
                calling_ae=settings.node.ae_title,
                max_fetch=max_fetch,
                max_attempts=max_attempts,
                lease_seconds=lease_seconds,
                scratch_dir=str(scratch.resolve()) if scratch else None,
            )
            code = _run(settings, req, resume, workers, (window, retry_backoff), dry_run, json_progress, mapping_key)
        except (BatchError, SourceError) as exc:
            typer.echo(f"batch: {exc.reason}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(code)


def _status(settings: Any, batch_id: int | None) -> int:
    from dicom_node.batch.results import batch_status
    from dicom_node.db import init_db, make_engine

    init_db(settings.database.url)
    db = make_engine(settings.database.url)
    try:
        data = batch_status(db, batch_id)
    except KeyError:
        typer.echo("no such batch" if batch_id is not None else "no batch yet", err=True)
        return 1
    finally:
        db.dispose()
    _print_status(data)
    return 0


def _run(
    settings: Any,
    req: Any,
    resume: int | None,
    workers: int | None,
    pacing: tuple[int, float],
    dry_run: bool,
    json_progress: bool,
    mapping_key: Path | None,
) -> int:
    from dicom_node.batch.driver import (
        CeleryPublisher,
        Driver,
        create_or_resume,
        enumerate_items,
        load_batch,
        write_mapping_key,
    )
    from dicom_node.batch.results import batch_status, write_table
    from dicom_node.batch.sources import parse_source
    from dicom_node.db import init_db, make_engine
    from dicom_node.jobs.celery_app import is_amqp
    from dicom_node.jobs.settings import model_version
    from dicom_node.logs import setup_logging

    setup_logging()
    if dry_run:
        from dicom_node.batch.driver import dry_run as run_dry

        def loader() -> Any:
            from dicom_node.jobs.context import WorkerContext

            return WorkerContext(settings).engine()

        est = run_dry(parse_source(req.source, req.options()), req, loader)
        typer.echo(json.dumps(est, indent=2))
        return 0
    init_db(settings.database.url)
    db = make_engine(settings.database.url)
    publisher = None
    procs: list[Any] = []
    try:
        if resume is not None:
            batch = load_batch(db, resume)
        else:
            parse_source(req.source, req.options())  # a bad SOURCE is refused before any row exists
            batch, created = create_or_resume(db, req, model_version(settings.model))
            if not created:
                log.info("batch %s: same command as before, resuming", batch.id)
        source = parse_source(batch.source, batch.options)
        enumerate_items(
            db,
            batch,
            source.studies(),
            max_attempts=req.max_attempts if resume is None else 3,
            lease_seconds=req.lease_seconds if resume is None else 60.0,
        )
        publisher = CeleryPublisher(settings.broker.url)
        n_workers = workers if workers is not None else (0 if is_amqp(settings.broker.url) else 1)
        if n_workers and batch_status(db, batch.id)["active"]:
            from dicom_node.jobs.worker import start_embedded_worker

            procs = [start_embedded_worker(settings, queues=["batch"]) for _ in range(n_workers)]
            log.info("batch %s: embedded worker(s) started (pid %s)", batch.id, ", ".join(str(p.pid) for p in procs))
        driver = Driver(db, batch, publisher, window=pacing[0], retry_backoff=pacing[1])
        stop = threading.Event()
        finished = _drive(driver, db, batch.id, stop, json_progress)
        parquet, csv_path, rows = write_table(db, batch.id or 0, Path(batch.out_dir))
        if mapping_key is not None:
            write_mapping_key(db, batch, mapping_key)
        data = batch_status(db, batch.id)
        if json_progress:
            print(json.dumps({"event": "finished", "results": str(parquet), "rows": rows, **data}), flush=True)
        else:
            _print_status(data)
            typer.echo(f"results: {parquet} and {csv_path} ({rows} row(s))")
        if not finished:
            return 130
        return 1 if data["counts"]["failed"] else 0
    finally:
        from dicom_node.jobs.worker import stop_worker

        for p in procs:
            stop_worker(p, 30)
        if publisher is not None:
            publisher.close()
        db.dispose()


def _drive(driver: Any, db: Any, batch_id: int, stop: threading.Event, json_progress: bool) -> bool:
    import signal
    import time

    from dicom_node.batch.results import batch_status

    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if json_progress:
            last = [0.0]

            def emit() -> None:
                if time.monotonic() - last[0] >= 1.0:
                    last[0] = time.monotonic()
                    d = batch_status(db, batch_id, failures=0)
                    print(
                        json.dumps(
                            {
                                "event": "progress",
                                **{
                                    k: d[k]
                                    for k in ("id", "total", "finished", "counts", "items_per_hour", "eta_seconds")
                                },
                                "held_for_clinical": driver.held_for_clinical,
                            }
                        ),
                        flush=True,
                    )

            return driver.run(stop, emit)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn(f"batch {batch_id}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} studies/h"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            transient=False,
            disable=not sys.stderr.isatty(),
        ) as bar:
            t = bar.add_task("items", total=driver.batch.items_total, rate="-", note="")
            last = [0.0]

            def update() -> None:
                if time.monotonic() - last[0] >= 0.5:
                    last[0] = time.monotonic()
                    d = batch_status(db, batch_id, failures=0)
                    note = "waiting: clinical jobs first" if driver.held_for_clinical else ""
                    bar.update(t, completed=d["finished"], total=d["total"], rate=d["items_per_hour"] or "-", note=note)

            return driver.run(stop, update)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
