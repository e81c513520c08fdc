#!/usr/bin/env bash
# Start the machine's PostgreSQL and RabbitMQ if they have stopped (integration tests use them).
set -uo pipefail
if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
if command -v rabbitmqctl >/dev/null && ! rabbitmqctl -q status >/dev/null 2>&1; then
  rabbitmq-server -detached || true
  for _ in $(seq 30); do rabbitmqctl -q status >/dev/null 2>&1 && break; sleep 1; done
fi
exit 0
