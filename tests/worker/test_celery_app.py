"""The Celery app's broker set-ups: durable embedded SQLite transport and RabbitMQ quorum queues."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from celery import Celery
from kombu import Connection

from dicom_node.jobs import celery_app as ca


def test_relative_embedded_broker_path_is_resolved(tmp_path: Path) -> None:
    url = ca.resolve_broker_url("sqla+sqlite:///var/broker.db", tmp_path)
    assert url == f"sqla+sqlite:///{tmp_path}/var/broker.db"
    assert (tmp_path / "var").is_dir()
    assert ca.resolve_broker_url("amqp://guest@h//") == "amqp://guest@h//"


def test_embedded_broker_keeps_messages_across_connections(tmp_path: Path) -> None:
    url = ca.resolve_broker_url(f"sqla+sqlite:///{tmp_path}/broker.db")
    app = ca.configure(Celery("t1"), url)
    app.send_task("unimedvl.run_job", args=[42], queue=ca.GENERATION_QUEUE)
    # a new connection (as after a restart) still finds the message in the SQLite file
    with Connection(url) as conn:
        q = conn.SimpleQueue(ca.GENERATION_QUEUE)
        msg = q.get(timeout=10)
        assert msg.payload[0] == [42]
        assert msg.headers["task"] == "unimedvl.run_job"
        msg.ack()
        q.close()


def test_rabbitmq_queues_are_quorum_with_dead_lettering(amqp_url: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    app = ca.configure(Celery("t2"), amqp_url)
    queues = [
        type(q)(f"{q.name}.{suffix}", q.exchange, routing_key=q.routing_key, queue_arguments=q.queue_arguments)
        for q in [*app.conf.task_queues, ca.dead_letter_queue()]
    ]
    assert ca.DEAD_LETTER_QUEUE not in {q.name for q in app.conf.task_queues}  # no worker consumes it
    with app.connection_for_write() as conn:
        chan = conn.default_channel
        try:
            for q in queues:
                q.bind(chan).declare()
            out = subprocess.run(
                ["rabbitmqctl", "-q", "list_queues", "name", "type", "arguments"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            lines = [line for line in out.splitlines() if suffix in line]
            assert len(lines) == 4, out  # understanding, generation, batch + dead letters
            for line in lines:
                assert "quorum" in line
            work = [line for line in lines if "dead" not in line]
            assert all("unimedvl.dlx" in line and "x-delivery-limit" in line for line in work), work
            # publisher confirms are on for AMQP
            assert app.conf.broker_transport_options["confirm_publish"] is True
            assert app.conf.task_acks_late and app.conf.worker_prefetch_multiplier == 1
        finally:
            for q in queues:
                q.bind(chan).delete()


def test_embedded_transport_polls_fast(tmp_path: Path) -> None:
    """A worker on the embedded broker picks a job up within ~0.1 s, not kombu's default 1 s."""
    from dicom_node.jobs.embedded_broker import ALIAS, Transport

    app = ca.configure(Celery("t3"), ca.resolve_broker_url(f"sqla+sqlite:///{tmp_path}/b.db"))
    assert app.conf.broker_url.startswith(f"{ALIAS}+sqlite:///")
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport) and conn.transport.polling_interval <= 0.1


def test_embedded_transport_is_woken_by_a_publish(tmp_path: Path, monkeypatch) -> None:
    """A consumer waiting on an empty queue gets a message published by another connection (as
    the planner's, in another process) at once: with the poll set to 10 s only the bell can
    deliver within the bound."""
    import threading
    import time

    from kombu import Exchange, Queue

    from dicom_node.jobs import embedded_broker as eb

    monkeypatch.setattr(eb.Transport, "polling_interval", 10.0)
    url = eb.embedded_url(ca.resolve_broker_url(f"sqla+sqlite:///{tmp_path}/b.db"))
    queue = Queue("bell", Exchange("bell", type="direct"), routing_key="bell")
    got: list[float] = []
    ready = threading.Event()
    transports: list[eb.Transport] = []

    def consume() -> None:
        with (
            Connection(url) as conn,
            conn.Consumer(queue, callbacks=[lambda _b, m: (got.append(time.monotonic()), m.ack())]),
        ):
            transports.append(conn.transport)
            ready.set()
            deadline = time.monotonic() + 8
            while not got and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=8)
                except TimeoutError:
                    pass

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert ready.wait(30)
    deadline = time.monotonic() + 10
    while transports[0]._bell is None and time.monotonic() < deadline:  # bound at its first empty poll
        time.sleep(0.01)
    assert transports[0]._bell is not None, "consumer never waited on its bell"
    with Connection(url) as conn:
        conn.SimpleQueue(queue).put({"job": 1})  # declares and binds too
    published = time.monotonic()
    t.join(15)
    assert got, "message not consumed"
    assert got[0] - published < 2.0
