"""The `unimedvl` command line."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="UniMedVL PACS gateway", no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks against peers measured in the same run", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

ConfigOption = typer.Option(None, "--config", "-c", help="config file (default ./unimedvl.toml if present)")


def _load(config: Path | None) -> Any:
    from dicom_node.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_service(config: Path | None, *, api: bool, embedded_worker: bool) -> None:
    import logging

    from dicom_node.logs import setup_logging

    settings = _load(config)
    setup_logging()
    from dicom_node.logs import guard_phi

    guard_phi(settings.node.log_phi)
    from dicom_node.service import Service

    log = logging.getLogger("dicom_node.cli")
    try:
        service = Service(settings, api=api, embedded_worker=embedded_worker)
        if api:  # before the API answers, so a login is possible as soon as it does
            from dicom_node.console.cli import announce_first_admin

            announce_first_admin(settings, f"http://{settings.http.bind}")
        service.start()
        # The process is ours: its start-up heap leaves the collector (see dicom_node/heap.py).
        # Not in Service.start, which also runs inside other programs (tests, the demo).
        from dicom_node.heap import freeze_long_lived

        log.info("start-up heap frozen: %d objects", freeze_long_lived())
    except Exception as exc:
        log.exception("gateway failed to start")
        typer.echo(f"gateway failed to start: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        _wait_for_signal()
    finally:
        log.info("shutting down")
        service.stop()


@app.command()
def serve(config: Path | None = ConfigOption) -> None:
    """Everything in the foreground on embedded defaults: node, completion, planner, an embedded
    worker, exporter and status API (Ctrl-C / SIGTERM stops cleanly)."""
    _run_service(config, api=True, embedded_worker=True)


@app.command()
def node(
    config: Path | None = ConfigOption,
    api: bool = typer.Option(False, "--api/--no-api", help="also serve the status API on [http] bind"),
) -> None:
    """Production split: node, completion, planner and exporter; model work goes to `unimedvl worker`."""
    _run_service(config, api=api, embedded_worker=False)


@app.command()
def status(
    config: Path | None = ConfigOption,
    limit: int = typer.Option(10, "--limit", help="rows of recent studies, rejections and duplicates"),
) -> None:
    """Counts, recent studies, rejections and duplicate conflicts."""
    from rich.console import Console

    from dicom_node import api
    from dicom_node.db import init_db, make_engine

    settings = _load(config)
    init_db(settings.database.url)
    engine = make_engine(settings.database.url).execution_options(readonly=True)
    console = Console()
    c = api.counts(engine)
    console.print(_kv_table("Index", c))
    console.print(_studies_table(api.study_summaries(engine, limit=limit), "Recent studies"))
    rej = api.rejection_list(engine, limit)
    console.print(
        _rows_table(
            "Recent rejections",
            ["at", "stage", "reason", "status", "calling_ae", "remote_ip", "detail"],
            rej,
        )
    )
    dup = api.duplicate_list(engine, limit)
    console.print(
        f"Duplicates: {dup['duplicates_total']} re-send(s) of {dup['instances_with_duplicates']} instance(s); "
        f"{c['duplicate_conflicts']} with different bytes"
    )
    if dup["conflicts"]:
        console.print(
            _rows_table(
                "Duplicate conflicts (different bytes)",
                ["at", "instance_id", "policy", "action", "calling_ae", "kept_aside"],
                dup["conflicts"],
            )
        )
    from dicom_node.export.cli import print_outbox_status
    from dicom_node.jobs.cli import print_jobs_status

    print_jobs_status(engine, console, settings)
    print_outbox_status(engine, console)
    engine.dispose()


@app.command()
def studies(
    config: Path | None = ConfigOption,
    limit: int = typer.Option(50, "--limit"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Recent studies with their revision and completion state."""
    import json

    from rich.console import Console

    from dicom_node import api
    from dicom_node.db import init_db, make_engine

    settings = _load(config)
    init_db(settings.database.url)
    engine = make_engine(settings.database.url).execution_options(readonly=True)
    rows = api.study_summaries(engine, limit=limit)
    engine.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    Console().print(_studies_table(rows, "Studies"))


def _kv_table(title: str, data: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("what", overflow="fold")
    t.add_column("count", justify="right")
    for k, v in data.items():
        t.add_row(k, str(v))
    return t


def _rows_table(title: str, cols: list[str], rows: list[dict[str, Any]]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title)
    for col in cols:
        t.add_column(col, overflow="fold")  # wrap long UIDs and messages instead of cutting them
    for r in rows:
        t.add_row(*(escape(str(r.get(col) if r.get(col) is not None else "")) for col in cols))
    return t


def _studies_table(rows: list[dict[str, Any]], title: str) -> Any:
    return _rows_table(
        title,
        [
            "id",
            "study_instance_uid",
            "accession_number",
            "study_date",
            "modalities",
            "instance_count",
            "revision",
            "state",
            "last_received_at",
        ],
        [{**r, "modalities": ",".join(r["modalities"])} for r in rows],
    )


@app.command()
def demo(
    config: Path | None = ConfigOption,
    timeout: float = typer.Option(900.0, "--timeout", help="seconds to wait for jobs and delivery"),
) -> None:
    """Send a synthetic study (CT volume with a lesion + chest CR) to the running gateway and list
    what it produced (start `unimedvl serve` with the same config first)."""
    from dicom_node.demo import run_demo

    raise typer.Exit(run_demo(_load(config), timeout=timeout))


@app.command()
def timeline(
    study_instance_uid: str = typer.Argument(..., help="StudyInstanceUID"),
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="print JSON (for scripts) instead of a tree"),
) -> None:
    """One study's timeline: received, complete, planned, jobs, outputs, delivered."""
    import json

    from dicom_node.db import init_db, make_engine
    from dicom_node.jobs.admin import study_timeline

    settings = _load(config)
    init_db(settings.database.url)
    engine = make_engine(settings.database.url).execution_options(readonly=True)
    try:
        data = study_timeline(engine, study_instance_uid)
    finally:
        engine.dispose()
    if data is None:
        typer.echo("no such study", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console

    from dicom_node.console.tree import timeline_tree

    Console().print(timeline_tree(data))


@app.command()
def retry(
    ids: list[int] | None = typer.Argument(None, help="outbox row ids (or job ids with --jobs)"),
    jobs: bool = typer.Option(False, "--jobs", help="the ids are jobs: re-run those model tasks"),
    all_failed: bool = typer.Option(False, "--all-failed", help="every failed delivery and every failed job"),
    destination: str | None = typer.Option(None, "--destination", help="only deliveries to this destination"),
    config: Path | None = ConfigOption,
) -> None:
    """Re-queue failed deliveries (attempts reset) and, with --jobs or --all-failed, re-run failed jobs."""
    from dicom_node.db import init_db, make_engine
    from dicom_node.export.outbox import requeue
    from dicom_node.jobs import Publisher, job_settings, retry_jobs

    if not ids and not all_failed:
        typer.echo("give ids (outbox rows, or jobs with --jobs), or --all-failed", err=True)
        raise typer.Exit(2)
    settings = _load(config)
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    try:
        if all_failed or not jobs:
            done = requeue(engine, ids=() if jobs else (ids or ()), all_failed=all_failed, destination=destination)
            skipped = sorted(set(ids or ()) - set(done)) if ids and not jobs else []
            if skipped:
                typer.echo(f"not re-queued (not failed, or unknown): {', '.join(map(str, skipped))}", err=True)
            typer.echo(f"re-queued {len(done)} row(s)" + (f": {', '.join(map(str, done))}" if done else ""))
        if jobs or (all_failed and destination is None):
            rerun = retry_jobs(
                engine,
                ids=ids if jobs else None,
                all_failed=all_failed,
                publisher=Publisher(settings.broker.url),
                jobs=job_settings(settings),
            )
            typer.echo(f"re-queued {len(rerun)} job(s)" + (f": {', '.join(map(str, rerun))}" if rerun else ""))
    finally:
        engine.dispose()


def _register_jobs() -> None:
    from dicom_node.jobs.cli import register

    register(app)  # `worker` and `jobs`


_register_jobs()


def _register_console() -> None:
    from dicom_node.console.cli import register

    register(app)  # `users`


_register_console()


def _register_eval() -> None:
    from dicom_node.eval_cli import register

    register(app)  # `eval`


_register_eval()


def _register_batch() -> None:
    from dicom_node.batch.cli import register

    register(app)  # `batch SOURCE --out DIR ...` and `batch status [ID]`


_register_batch()


@contextmanager
def _benchmarks_needed() -> Iterator[None]:
    """Around `from benchmarks...` imports: the benchmarks ship with the source tree only, so
    when they are absent say where to get them and exit 2."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("benchmarks"):
            raise
        typer.echo(
            "the benchmarks are not installed: they come with the source repository "
            "(git clone it, then `bash scripts/setup.sh` and run from its folder)",
            err=True,
        )
        raise typer.Exit(2) from None


@bench_app.command("ingest")
def bench_ingest(
    n: int = typer.Option(200, "--n", help="synthetic CT slices per run"),
    out: str = typer.Option("", "--out", help="also write the figures as JSON here"),
) -> None:
    """C-STORE ingest: our node vs DCMTK storescp vs Orthanc."""
    with _benchmarks_needed():
        from benchmarks.ingest import main
    raise typer.Exit(main(n=n, out=out or None))


@bench_app.command("engine")
def bench_engine(
    out: str = typer.Option("", "--out", help="also write the figures as JSON here"),
) -> None:
    """Model engine: prefill/decode tokens/s, denoise steps/s, PyTorch vs onnxruntime encoders."""
    with _benchmarks_needed():
        from benchmarks.engine import main
    raise typer.Exit(main(out=out or None))


if __name__ == "__main__":
    app()
