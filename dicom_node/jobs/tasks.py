"""Celery tasks: `unimedvl.run_job(job_id)` runs one model job recorded in the database.

The message carries only the job id; everything else (task, parameters, series, attempts,
lease) is in the job row, so a duplicate or replayed message is harmless: the worker claims
the row with one conditional UPDATE and acks-and-ignores a job that is done, failed or held
by a live worker. A job's own failure never raises here (it is recorded on the row), so the
broker never re-delivers a job that failed cleanly; crashes are covered by acks_late +
reject_on_worker_lost on RabbitMQ and by the planner's lease sweeper on every broker.
"""

from __future__ import annotations

from celery.signals import worker_process_init

from dicom_node.jobs.celery_app import app
from dicom_node.jobs.context import current_context
from dicom_node.jobs.lifeline import watch_parent

RUN_JOB = "unimedvl.run_job"


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: int) -> str:
    return current_context().run(int(job_id))


@worker_process_init.connect
def _warm_model(**_: object) -> None:
    """Load the model in each new pool child right away (in a thread: Celery times out slow inits),
    and end the child if its Celery main process dies (no orphan holding the model)."""
    watch_parent(what="pool child")
    current_context().warm_up_in_background()
