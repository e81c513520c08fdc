"""The embedded broker: kombu's SQLAlchemy transport with a short polling interval.

kombu's virtual transports sleep `polling_interval` (1 s by default) after every empty poll,
and with acks_late + prefetch 1 a worker pays that wait once per job: about a second of
turnaround per job on an idle queue. The sqlalchemy transport cannot take the interval as a
transport option (it hands every option to `create_engine`), so this subclass sets it.
It uses kombu's tables unchanged; `sqla+` URLs are mapped to it by `embedded_url`.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport

ALIAS = "unimedvl-sqla"
# Idle cost, measured (a consumer on the worker's three queues, 2-core machine at load ~2):
# 0.1 s -> 8 % of one core, 0.05 s -> 16 %, 1 s -> <1 %. 0.1 s costs a job 0.05 s of pickup on
# average; halving that is not worth doubling the idle CPU of every worker. RabbitMQ pushes.
POLLING_INTERVAL_S = 0.1


class Transport(SQLAlchemyTransport):
    polling_interval = POLLING_INTERVAL_S


TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")


def embedded_url(url: str) -> str:
    """`sqla+sqlite:///…` -> the same database through this transport; other URLs unchanged."""
    for prefix in ("sqla+", "sqlalchemy+"):
        if url.startswith(prefix):
            return f"{ALIAS}+{url[len(prefix) :]}"
    return url
