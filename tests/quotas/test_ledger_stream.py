"""The ledger through Redis: gateways append, Celery workers drain; nothing lost, nothing twice.

The worker tests run real `celery -A limiter_site worker` processes against the real Redis
broker and the test database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from accounts.services import create_api_key, get_or_create_user
from quotas import ledger_stream
from quotas.models import UsageRecord
from tests.gateway.conftest import database_url_for_subprocess
from tests.procs import stop_group, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def stream(settings: Any, redis_url: str) -> Iterator[redis_lib.Redis]:
    settings.LEDGER_STREAM = f"test-ledger-{uuid.uuid4().hex[:8]}"
    settings.LEDGER_CLAIM_IDLE_SECONDS = 0.2
    connection = redis_lib.Redis.from_url(redis_url)
    yield connection
    connection.delete(settings.LEDGER_STREAM)
    connection.close()


def rows_for(count: int) -> tuple[Any, list[tuple[Any, ...]]]:
    user, _ = get_or_create_user(f"원장-{uuid.uuid4().hex[:6]}")
    key, _ = create_api_key(user, actor=None)
    now = time.time()
    rows = [
        (uuid.uuid4().hex, user.pk, key.pk, "Qwen/Qwen2.5-7B-Instruct", "chat/completions",
         10, 20, 0, 10, "upstream", 200, "", False, False, now + i / 1000, now + i / 1000 + 0.1,
         5.0, None)
        for i in range(count)
    ]  # fmt: skip
    return user, rows


def test_drain_writes_each_event_once_and_empties_the_stream(stream: redis_lib.Redis) -> None:
    user, rows = rows_for(250)
    ledger_stream.append_rows(stream, rows)
    ledger_stream.append_rows(stream, rows[:50])  # a gateway retrying a batch it already sent
    assert ledger_stream.drain(count=100) == 300
    assert UsageRecord.objects.filter(user=user).count() == 250
    assert ledger_stream.backlog(stream) == 0


def test_entries_of_a_dead_consumer_are_claimed_and_written(
    stream: redis_lib.Redis, settings: Any
) -> None:
    user, rows = rows_for(40)
    ledger_stream.append_rows(stream, rows)
    ledger_stream.ensure_group(stream)
    # A worker took the entries and died before writing them.
    stream.xreadgroup(ledger_stream.GROUP, "dead-worker", {settings.LEDGER_STREAM: ">"}, count=40)
    assert ledger_stream.drain() == 0  # not idle long enough yet
    time.sleep(0.3)
    assert ledger_stream.drain() == 40
    assert UsageRecord.objects.filter(user=user).count() == 40


def test_a_database_failure_keeps_the_entries(stream: redis_lib.Redis, monkeypatch) -> None:
    user, rows = rows_for(30)
    ledger_stream.append_rows(stream, rows)

    def down(*args: object) -> None:
        raise RuntimeError("database down")

    monkeypatch.setattr(ledger_stream, "record_usage_lines", down)
    with pytest.raises(RuntimeError):
        ledger_stream.drain()
    monkeypatch.undo()
    assert ledger_stream.backlog(stream) == 30
    time.sleep(0.3)  # the failed batch is pending: claimed once idle
    assert ledger_stream.drain() == 30
    assert UsageRecord.objects.filter(user=user).count() == 30


class Worker:
    """A real Celery worker (with beat inside, which schedules drain_ledger every 0.2 s)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "limiter_site", "worker", "-B",
             "--pool", "solo", "--loglevel", "INFO", "-s", str(log.with_suffix(".beat"))],
            cwd=ROOT, env={**os.environ, "DEBUG": "1", **env},
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL for the worker and its beat child: no chance to finish or acknowledge."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(
    stream: redis_lib.Redis, settings: Any, redis_url: str, tmp_path: Path
) -> None:
    user, rows = rows_for(6000)
    for start in range(0, len(rows), 1000):
        ledger_stream.append_rows(stream, rows[start : start + 1000])
    env = {
        "DATABASE_URL": database_url_for_subprocess(),
        "REDIS_URL": redis_url,
        "LEDGER_STREAM": settings.LEDGER_STREAM,
        "LEDGER_CLAIM_IDLE_SECONDS": "1",
        "LEDGER_DRAIN_SECONDS": "0.2",
    }

    def written() -> int:
        return UsageRecord.objects.filter(user=user).count()

    first = Worker(env, tmp_path / "worker1.log")
    try:
        wait_until("the first rows", lambda: written() > 0, 60, every=0.1)
    finally:
        first.kill()  # SIGKILL: no chance to finish or acknowledge its batch
    assert written() < len(rows), "the worker finished before it could be killed"
    second = Worker(env, tmp_path / "worker2.log")
    try:
        wait_until(
            "all rows",
            lambda: written() == len(rows) and ledger_stream.backlog(stream) == 0, 90, every=0.1,
        )  # fmt: skip
    finally:
        second.stop()
    assert written() == len(rows)


@pytest.mark.slow
def test_events_wait_for_a_worker_whose_database_is_unreachable(
    stream: redis_lib.Redis, settings: Any, redis_url: str, tmp_path: Path
) -> None:
    user, rows = rows_for(500)
    ledger_stream.append_rows(stream, rows)
    env = {
        "REDIS_URL": redis_url,
        "LEDGER_STREAM": settings.LEDGER_STREAM,
        "LEDGER_CLAIM_IDLE_SECONDS": "0.5",
        "LEDGER_DRAIN_SECONDS": "0.2",
    }
    broken = Worker(
        {**env, "DATABASE_URL": "postgres://nobody@127.0.0.1:1/nowhere"}, tmp_path / "w1.log"
    )
    try:
        time.sleep(4)  # several drain attempts, all failing
    finally:
        broken.stop()
    assert UsageRecord.objects.filter(user=user).count() == 0
    assert ledger_stream.backlog(stream) == 500
    healthy = Worker({**env, "DATABASE_URL": database_url_for_subprocess()}, tmp_path / "w2.log")
    try:
        wait_until(
            "the backlog to drain", lambda: ledger_stream.backlog(stream) == 0, 60, every=0.1
        )
    finally:
        healthy.stop()
    assert UsageRecord.objects.filter(user=user).count() == 500


def test_health_warns_about_a_ledger_backlog(stream: redis_lib.Redis, monkeypatch) -> None:
    import asyncio

    from gateway import health
    from gateway.app import Gateway

    _, rows = rows_for(20)
    ledger_stream.append_rows(stream, rows)
    monkeypatch.setattr(health, "LEDGER_BACKLOG_WARNING", 10)
    report = asyncio.run(Gateway().readiness.report())
    assert report["redis"]["ledger_stream_backlog"] == 20
    assert any("ledger stream" in warning for warning in report["warnings"])


def test_metrics_report_the_stream_backlog(stream: redis_lib.Redis, settings) -> None:
    import asyncio

    import httpx2
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.app import Gateway

    _, rows = rows_for(7)
    ledger_stream.append_rows(stream, rows)
    token = settings.GATEWAY_MONITORING_TOKEN = "a-monitoring-token-of-some-length"

    async def scrape() -> str:
        transport = httpx2.ASGITransport(app=Gateway())
        async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as http:
            response = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
            return response.text

    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(asyncio.run(scrape()))
        for sample in family.samples
    }
    assert values["gateway_ledger_stream_backlog"] == 7
