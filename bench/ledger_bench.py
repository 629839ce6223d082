"""Ledger: the request path's cost of recording, and ingestion rows per second.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_ledger \\
    REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/ledger_bench.py [--rows 20000] [--write docs/benchmarks.md]

The database named by DATABASE_URL is migrated and written to (use a scratch database).
Recording = building the usage event and appending it to the process's spool file, which is
all the request path does. Ingestion = the writer's batch insert into the database directly (the
embedded mode), and the production path: gateways' pipelined XADD to the Redis stream, then
the Celery task's drain (read, insert, acknowledge, delete).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
os.environ.setdefault("DEBUG", "1")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from bench.gateway_bench import write_section  # noqa: E402
from gateway.ledger import LedgerWriter, RequestFacts, _ship  # noqa: E402
from tokenlimit.ledger_rows import UsageRow, clean_row, wire_line  # noqa: E402


def event(user_id: int, key_id: int) -> UsageRow:
    now = time.time()
    return UsageRow(
        request_id=uuid.uuid4().hex, user_id=user_id, api_key_id=key_id,
        model="Qwen/Qwen2.5-7B-Instruct", endpoint="chat/completions", status_code=200,
        streamed=True, started_at=now, finished_at=now + 0.2, prompt_tokens=48,
        completion_tokens=100, estimated_prompt_tokens=48, upstream_latency_ms=3.2,
        time_to_first_token_ms=41.0,
    )  # fmt: skip


def recording_cost(write_ahead: bool, samples: int = 20000) -> tuple[float, float]:
    """p50/p99 µs per request of what the request path writes: the finished row, and with
    `write_ahead` also the open line at admission (what the gateway does since issue 9)."""
    import tempfile

    spool = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    writer = LedgerWriter(flush_seconds=3600, max_pending=samples + 1, spool_dir=spool)
    scopes: list[list[object]] = [["u:1", 60, 10000, 100000, 1000000, 1, 8]]
    timings = []
    try:
        for _ in range(samples):
            done = event(1, 1)
            started = time.perf_counter()
            if write_ahead:
                writer.open(
                    RequestFacts(done.request_id, 1, 1, done.model, done.endpoint, True,
                                done.started_at, 48, scopes)
                )  # fmt: skip
            writer.record(done)
            timings.append((time.perf_counter() - started) * 1e6)
    finally:
        writer.close()
    timings.sort()
    return timings[len(timings) // 2], timings[int(len(timings) * 0.99)]


def rows_as_lines(rows: int, user_id: int, key_id: int) -> list[str]:
    return [wire_line(clean_row(event(user_id, key_id), time.time)).decode() for _ in range(rows)]


def ingest_direct(rows: int, user_id: int, key_id: int) -> float:
    batch = rows_as_lines(rows, user_id, key_id)
    saved, settings.REDIS_URL = settings.REDIS_URL, ""
    try:
        started = time.perf_counter()
        for first in range(0, rows, 1000):
            _ship(batch[first : first + 1000])
        return rows / (time.perf_counter() - started)
    finally:
        settings.REDIS_URL = saved


def ingest_stream(rows: int, user_id: int, key_id: int) -> tuple[float, float]:
    from quotas import ledger_stream

    settings.LEDGER_STREAM = f"bench-ledger-{uuid.uuid4().hex[:6]}"
    batch = rows_as_lines(rows, user_id, key_id)
    started = time.perf_counter()
    for first in range(0, rows, 1000):
        _ship(batch[first : first + 1000])
    appended = rows / (time.perf_counter() - started)
    started = time.perf_counter()
    drained = ledger_stream.drain(max_batches=10**6, count=1000)
    assert drained == rows, drained
    return appended, rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    from accounts.services import create_api_key, get_or_create_user

    user, _ = get_or_create_user("원장벤치")
    key, _ = create_api_key(user, actor=None)
    p50, p99 = recording_cost(write_ahead=False)
    ahead50, ahead99 = recording_cost(write_ahead=True)
    direct = ingest_direct(args.rows, user.pk, key.pk)
    lines = [
        f"Database: {django.db.connection.vendor}; {args.rows:,} rows per measurement.",
        "",
        "| measurement | result |",
        "| --- | --- |",
        f"| request path: build + spool one usage event, p50 / p99 | {p50:.2f} / {p99:.2f} µs |",
        f"| … with the write-ahead open line (as served), p50 / p99 | {ahead50:.2f} / "
        f"{ahead99:.2f} µs |",
        f"| direct batch insert (embedded mode) | {direct:,.0f} rows/s |",
    ]
    if settings.REDIS_URL:
        appended, drained = ingest_stream(args.rows, user.pk, key.pk)
        lines.append(f"| gateway → Redis stream (pipelined XADD) | {appended:,.0f} rows/s |")
        lines.append(f"| Celery drain: stream → database, ack, delete | {drained:,.0f} rows/s |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, "ledger", text)


if __name__ == "__main__":
    main()
