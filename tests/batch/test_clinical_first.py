"""Clinical jobs always go first: a routed study finishes while a large batch is queued on the
same worker (the driver holds batch work back while clinical jobs wait; at most `--window`
batch messages are ever ahead of a clinical one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.batch.conftest import fixed_length_rules, make_archive
from tests.conftest import REPO
from tests.jobs.conftest import FAST_RULES, complete_all, cr_study, ingest, wait_for, write_config


@pytest.mark.slow
@pytest.mark.timeout(720)  # a cold first start of worker + batch on a busy 2-core CI machine
def test_routed_study_finishes_while_a_large_batch_is_queued(tmp_path: Path) -> None:
    from dicom_node.config import load_config
    from dicom_node.db import init_db, make_engine
    from dicom_node.jobs.planner import Planner, Publisher
    from dicom_node.jobs.worker import start_embedded_worker
    from dicom_node.routing import parse_rules

    root = tmp_path / "archive"
    studies = make_archive(root, n_cr=8, ct_slices=0, us=False)
    settings = load_config(
        write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    )
    init_db(settings.database.url)
    engine = make_engine(settings.database.url)
    env = {"PYTHONPATH": str(REPO)}
    wlog = (tmp_path / "worker.log").open("wb")
    worker = start_embedded_worker(
        settings, queues=["understanding", "batch"], stdout=wlog, stderr=subprocess.STDOUT, env=env
    )
    blog = tmp_path / "batch.log"
    # Items of fixed length (150 steps, ~3 s each): the batch cannot end before the clinical job is planned.
    rules = fixed_length_rules(tmp_path, 150)
    args = ["batch", str(root), "--out", str(tmp_path / "out"), "--rules", str(rules)]
    args += ["--workers", "0", "--window", "2", "--json-progress", "-c", str(settings.config_path)]
    batch = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", *args],
        cwd=REPO,
        stdout=blog.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        start_new_session=True,
    )
    publisher = Publisher(settings.broker.url)

    def finished_items() -> int:
        with engine.connect() as c:
            return int(
                c.execute(text("SELECT count(*) FROM batch_item WHERE state IN ('done','failed','skipped')")).scalar()
                or 0
            )

    try:
        wait_for(
            finished_items,
            480,
            "the batch under way",
            lambda: (
                blog.read_text()[-3000:] + "\n--- worker ---\n" + Path(wlog.name).read_text(errors="replace")[-3000:]
            ),
        )
        ingest(settings, cr_study(tmp_path / "clinical"))
        (event,) = complete_all(engine, settings)
        planner = Planner(engine, parse_rules(FAST_RULES), publisher)
        planner.plan_revision(event.study_instance_uid, event.revision)
        before = finished_items()

        def job_done() -> bool:
            with engine.connect() as c:
                return c.execute(text("SELECT state FROM job")).scalar() == "done"

        wait_for(job_done, 240, "the clinical job", lambda: wlog.name)
        after = finished_items()
        # At most the window's batch items ran ahead of the clinical job (plus the one running).
        assert after - before <= 3, (before, after)
        assert after < len(studies), "the batch had already finished: the test proves nothing"
        with engine.connect() as c:
            queued = c.execute(text("SELECT count(*) FROM batch_item WHERE state IN ('pending','queued')")).scalar()
        assert queued and queued >= 2
    finally:
        for p in (batch, worker):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        publisher.close()
        engine.dispose()
        wlog.close()
