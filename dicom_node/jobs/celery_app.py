"""The Celery application that carries model jobs from the node to GPU workers.

Two broker set-ups, one code path:
- embedded (default): kombu's SQLAlchemy transport on a SQLite file under ./var, so
  `unimedvl serve` needs no external service and messages survive a restart;
- RabbitMQ (production): quorum queues (replicated, with a delivery limit), publisher
  confirms, dead-lettering to `unimedvl.dead`, acks_late + prefetch 1 so a killed worker's
  message is redelivered.

The job table in the database stays the source of truth (a job is a row before it is a
message, and results go to the DB and storage, never to a result backend); the broker only
says "job N is ready". That is what makes the embedded transport safe too: it hides a message
when a worker takes it, so a worker killed mid-task is covered by the planner's re-publishing
of stale jobs, not by the broker.
`celery -A dicom_node.jobs.celery_app worker` works with UNIMEDVL_BROKER__URL set.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

UNDERSTANDING_QUEUE = "unimedvl.understanding"
GENERATION_QUEUE = "unimedvl.generation"
# Research batch items (dicom_node.batch): their own queue, fed in a small window by the batch
# driver, which holds back while clinical jobs wait, so clinical work always goes first.
BATCH_QUEUE = "unimedvl.batch"
DEAD_LETTER_EXCHANGE = "unimedvl.dlx"
DEAD_LETTER_QUEUE = "unimedvl.dead"
DEFAULT_BROKER_URL = "sqla+sqlite:///var/broker.db"
# Longer than the longest task (a 50-step 1024^2 generation on a slow GPU, or CPU demo runs).
DEFAULT_CONSUMER_TIMEOUT_MS = 4 * 3600 * 1000
# Broker-side redelivery cap; the job table keeps its own attempt counter as well.
DELIVERY_LIMIT = 5

TASK_QUEUES = {
    "report": UNDERSTANDING_QUEUE,
    "vqa": UNDERSTANDING_QUEUE,
    "segment": GENERATION_QUEUE,
    "translate": GENERATION_QUEUE,
    "super_resolve": GENERATION_QUEUE,
    "synthesize": GENERATION_QUEUE,
}


def is_amqp(url: str) -> bool:
    return url.split(":", 1)[0] in ("amqp", "amqps", "pyamqp")


def resolve_broker_url(url: str, base: Path | None = None) -> str:
    """Make a relative embedded-SQLite broker path absolute and create its folder."""
    prefix = "sqla+sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        path = (base or Path.cwd()) / url[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return url


def task_queues(amqp: bool, consumer_timeout_ms: int = DEFAULT_CONSUMER_TIMEOUT_MS) -> list[Queue]:
    exchange = Exchange("unimedvl", type="direct", durable=True)
    if not amqp:
        return [Queue(q, exchange, routing_key=q) for q in (UNDERSTANDING_QUEUE, GENERATION_QUEUE, BATCH_QUEUE)]
    args = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-delivery-limit": DELIVERY_LIMIT,
        # Honoured per queue from RabbitMQ 3.12; older servers use the global consumer_timeout
        # (deploy/rabbitmq.conf sets it above the longest task as well).
        "x-consumer-timeout": consumer_timeout_ms,
    }
    return [
        Queue(q, exchange, routing_key=q, queue_arguments=args)
        for q in (UNDERSTANDING_QUEUE, GENERATION_QUEUE, BATCH_QUEUE)
    ]


def dead_letter_queue() -> Queue:
    """Where RabbitMQ puts messages past their delivery limit. Not in task_queues, so no worker
    (not even a plain `celery worker` without -Q) consumes it: an operator inspects it."""
    dlx = Exchange(DEAD_LETTER_EXCHANGE, type="fanout", durable=True)
    return Queue(DEAD_LETTER_QUEUE, dlx, routing_key="#", queue_arguments={"x-queue-type": "quorum"})


def declare_dead_letter_queue(app: Celery) -> None:
    """Declare the dead-letter exchange and queue (RabbitMQ only; idempotent)."""
    if not is_amqp(app.conf.broker_url):
        return
    with app.connection_for_write() as conn:
        dead_letter_queue().bind(conn.default_channel).declare()


def configure(app: Celery, broker_url: str, *, consumer_timeout_ms: int = DEFAULT_CONSUMER_TIMEOUT_MS) -> Celery:
    from dicom_node.jobs.embedded_broker import embedded_url
    from dicom_node.jobs.pool import POOL

    amqp = is_amqp(broker_url)
    app.conf.update(
        broker_url=embedded_url(broker_url),
        broker_connection_retry_on_startup=True,
        task_queues=task_queues(amqp, consumer_timeout_ms),
        task_default_queue=UNDERSTANDING_QUEUE,
        task_default_exchange="unimedvl",
        task_create_missing_queues=False,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # The embedded transport is woken by each publish, polling every 0.1 s as the safety net
        # (dicom_node.jobs.embedded_broker).
        broker_transport_options={"confirm_publish": True, "max_retries": 5} if amqp else {},
        broker_pool_limit=4,
        # Prefork, with pool children that survive a sibling's SIGKILL (dicom_node.jobs.pool).
        worker_pool=POOL,
    )
    return app


app = configure(
    # include: `celery -A dicom_node.jobs.celery_app worker` registers unimedvl.run_job and the batch task.
    Celery("unimedvl", include=["dicom_node.jobs.tasks", "dicom_node.batch.task"]),
    resolve_broker_url(os.environ.get("UNIMEDVL_BROKER__URL", DEFAULT_BROKER_URL)),
)
