"""The ledger's way through Redis: gateways append usage events to a stream, Celery drains it.

Gateways (their writer thread, never the event loop) XADD batches of rows to LEDGER_STREAM.
The `drain_ledger` task reads them as a consumer group, writes them to the database in one
transaction (idempotent by request id) and only then acknowledges and deletes them. A worker
killed mid-batch leaves its entries pending; the next drain claims entries idle for
LEDGER_CLAIM_IDLE_SECONDS and writes them (again: the database skips what it already has). If
the database is down, entries stay in the stream until it is back. Nothing is held in worker
memory between batches, so a backlog costs Redis memory only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

import redis
from django.conf import settings

from quotas.services import record_usage_rows

log = logging.getLogger(__name__)
GROUP = "ledger-writers"
FIELD = "row"


def client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)


def append_rows(connection: redis.Redis, rows: list[tuple[Any, ...]]) -> None:
    """One pipelined round trip for the whole batch."""
    pipe = connection.pipeline(transaction=False)
    for row in rows:
        pipe.xadd(settings.LEDGER_STREAM, {FIELD: json.dumps(row, ensure_ascii=False)})
    pipe.execute()


def ensure_group(connection: redis.Redis) -> None:
    try:
        connection.xgroup_create(settings.LEDGER_STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def drain_once(connection: redis.Redis, consumer: str, count: int) -> int:
    """Write one batch (stale pending entries first); returns how many entries it handled."""
    ensure_group(connection)
    idle_ms = int(settings.LEDGER_CLAIM_IDLE_SECONDS * 1000)
    _, entries, *_ = connection.xautoclaim(
        settings.LEDGER_STREAM, GROUP, consumer, min_idle_time=idle_ms, start_id="0-0", count=count
    )
    if not entries:
        answer: Any = connection.xreadgroup(
            GROUP, consumer, {settings.LEDGER_STREAM: ">"}, count=count
        )
        # RESP2 answers [[stream, entries]], RESP3 {stream: [entries]}.
        if isinstance(answer, dict):
            entries = next(iter(answer.values()), [[]])[0] if answer else []
        else:
            entries = answer[0][1] if answer else []
    entries = [(entry_id, fields) for entry_id, fields in entries if fields]
    if not entries:
        return 0
    rows = [tuple(json.loads(fields[FIELD.encode()])) for _, fields in entries]
    record_usage_rows(rows)  # commits before anything is acknowledged
    ids = [entry_id for entry_id, _ in entries]
    # Both or neither (MULTI/EXEC): a worker killed between an XACK and its XDEL left entries
    # acknowledged, so never claimed again, yet never deleted, counted as backlog for ever.
    done = connection.pipeline(transaction=True)
    done.xack(settings.LEDGER_STREAM, GROUP, *ids)
    done.xdel(settings.LEDGER_STREAM, *ids)
    done.execute()
    return len(entries)


def drain(max_batches: int = 50, count: int = 1000) -> int:
    """Drain until the stream is empty or `max_batches` batches were written."""
    connection = client()
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    total = 0
    try:
        for _ in range(max_batches):
            handled = drain_once(connection, consumer, count)
            total += handled
            if handled < count:
                break
    finally:
        connection.close()
    return total


def backlog(connection: redis.Redis) -> int:
    """Events in the stream not yet written to the database (pending ones included)."""
    return int(connection.xlen(settings.LEDGER_STREAM))
