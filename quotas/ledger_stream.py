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
import time
from typing import Any

import redis
from django.conf import settings

from quotas.services import record_usage_lines

log = logging.getLogger(__name__)
GROUP = "ledger-writers"
FIELD = "row"


def client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)


def append_lines(connection: redis.Redis, lines: list[str]) -> None:
    """Rows as the spool holds them (JSON text), in one pipelined round trip. A line that is
    not a row is carried all the same: the worker dead-letters it, with the database's view."""
    pipe = connection.pipeline(transaction=False)
    for line in lines:
        pipe.xadd(settings.LEDGER_STREAM, {FIELD: line})
    pipe.execute()


def append_rows(connection: redis.Redis, rows: list[tuple[Any, ...]]) -> None:
    append_lines(connection, [json.dumps(row, ensure_ascii=True) for row in rows])


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
    # Commits (rows, and what cannot be written as dead letters) before anything is acked.
    record_usage_lines([fields.get(FIELD.encode(), b"") for _, fields in entries], "stream")
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
        # Readiness tells "no worker drains" from "nothing to drain" by this heartbeat.
        connection.set(drained_key(), repr(time.time()), ex=7 * 24 * 3600)
    finally:
        connection.close()
    return total


def drained_key() -> str:
    return f"{settings.LEDGER_STREAM}:drained-at"


def oldest_age(first_entry_id: bytes | str | None, now: float) -> float:
    """Seconds since the oldest entry still in the stream was added (its id is its time)."""
    if not first_entry_id:
        return 0.0
    entry = first_entry_id.decode() if isinstance(first_entry_id, bytes) else first_entry_id
    return max(now - int(entry.split("-")[0]) / 1000.0, 0.0)


# What the ledger asks of Redis: the append-only file, so that events shipped to the stream
# and not yet written survive a Redis restart (README, "Production").
REQUIRED_PERSISTENCE = "appendonly yes"


def persistence_problem(config: dict[Any, Any]) -> str | None:
    """Why this Redis (its CONFIG GET answer) could lose shipped events on restart; None if fine."""
    answer = {_text(k): _text(v) for k, v in config.items()}
    value = answer.get("appendonly")
    if value == "yes":
        return None
    return (
        f"Redis runs without the append-only file (appendonly={value or 'unknown'}): usage "
        f"events waiting in the ledger stream would be lost if Redis restarted. Set "
        f"`{REQUIRED_PERSISTENCE}` (and keep `appendfsync everysec` or `always`)."
    )


def unverifiable(exc: Exception) -> str:
    return (
        f"cannot check Redis persistence ({exc}); if it keeps an append-only file, set "
        "LEDGER_REDIS_PERSISTENCE=trust"
    )


def check_persistence(connection: redis.Redis) -> str | None:
    """`persistence_problem` of this Redis, asked now (the worker, at start)."""
    if settings.LEDGER_REDIS_PERSISTENCE == "trust":
        return None
    try:
        return persistence_problem(connection.config_get("appendonly"))
    except redis.ResponseError as exc:  # CONFIG renamed or disabled (managed Redis)
        return unverifiable(exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def backlog(connection: redis.Redis) -> int:
    """Events in the stream not yet written to the database (pending ones included)."""
    return int(connection.xlen(settings.LEDGER_STREAM))
