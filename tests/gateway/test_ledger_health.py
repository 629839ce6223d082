"""Health tells the truth about the ledger, events survive a Redis restart, and a gateway shuts
down cleanly: readiness warns on the age of the oldest pending event (not only on a count),
on a stream no worker drains and on dead letters; it refuses to be ready on a Redis without
the append-only file; /metrics exposes the age and the dead letters; lifespan shutdown ships
the spool and stops the writer."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.ledger import LedgerWriter
from quotas import ledger_stream
from quotas.models import LedgerDeadLetter, UsageRecord
from tests.gateway.conftest import FAST_MODEL
from tests.procs import RedisProcess, free_port, simulator
from tokenlimit.ledger_rows import UsageRow

TOKEN = "a-monitoring-token-of-some-length"


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with simulator(FAST_MODEL, tokens_per_second=0, ttft_ms=0) as url:
        yield url


@pytest.fixture
def gateway(settings: Any, upstream: str) -> Iterator[Gateway]:
    settings.SGLANG_URL = upstream
    settings.GATEWAY_MONITORING_TOKEN = TOKEN
    made = Gateway()
    yield made
    asyncio.run(made.close())


def events(count: int, started: float | None = None) -> list[UsageRow]:
    now = started or time.time()
    return [
        UsageRow(uuid.uuid4().hex, 1, 1, "m", "chat/completions", 200, False, now, now, 5, 6)
        for _ in range(count)
    ]


async def ready_and_metrics(gateway: Gateway) -> tuple[dict[str, Any], dict[str, float]]:
    transport = httpx2.ASGITransport(app=gateway)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as http:
        report = (await http.get("/health/ready", headers=headers)).json()
        text = (await http.get("/metrics", headers=headers)).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return report, values


@pytest.mark.django_db(transaction=True)
def test_an_old_event_in_the_spool_and_dead_letters_are_reported(
    gateway: Gateway, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.REDIS_URL = ""
    settings.LEDGER_PENDING_WARNING_SECONDS = 5
    LedgerDeadLetter.objects.create(source="spool", raw='"x"', error="not JSON")
    for event in events(3):
        gateway.ledger.record(event)
    assert gateway.ledger._spool is not None
    gateway.ledger._spool.first_event_at = time.time() - 30  # the database has been down 30 s
    report, values = asyncio.run(ready_and_metrics(gateway))
    ledger = report["ledger"]
    assert ledger["pending"] == 3 and ledger["dead_letters"] == 1
    assert "dead_letters" not in report["database"]  # said once
    assert ledger["oldest_pending_seconds"] >= 30
    assert any("waited 30 s" in w for w in report["warnings"])
    assert any("dead letters" in w for w in report["warnings"])
    assert values["gateway_ledger_oldest_pending_seconds"] >= 30
    assert values["gateway_ledger_dead_letters"] == 1
    # Shipped: nothing waits any more, and the age says so.
    gateway.ledger.flush()
    gateway.readiness._report = None
    report, values = asyncio.run(ready_and_metrics(gateway))
    assert report["ledger"]["oldest_pending_seconds"] == 0
    assert not any("waited" in w for w in report["warnings"])


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_stream_no_worker_drains_is_reported_by_age(
    gateway: Gateway, settings: Any, redis_url: str
) -> None:
    settings.LEDGER_STREAM = f"test-age-{uuid.uuid4().hex[:8]}"
    settings.LEDGER_PENDING_WARNING_SECONDS = 60
    connection = redis_lib.Redis.from_url(redis_url)
    try:
        # 300 events (far below any count threshold), the oldest 2 minutes old.
        old_id = f"{int((time.time() - 120) * 1000)}-0"
        connection.xadd(settings.LEDGER_STREAM, {"row": "[]"}, id=old_id)
        ledger_stream.append_lines(connection, ["[]"] * 299)
        report, values = asyncio.run(ready_and_metrics(gateway))
        ledger = report["ledger"]
        assert ledger["stream_backlog"] == 300 and ledger["last_drain_seconds_ago"] is None
        assert 120 <= ledger["oldest_pending_seconds"] < 180
        assert any("waited 12" in w for w in report["warnings"])
        assert any("no worker has drained it yet" in w for w in report["warnings"])
        assert values["gateway_ledger_oldest_pending_seconds"] >= 120
        assert values["gateway_ledger_stream_backlog"] == 300
    finally:
        connection.delete(settings.LEDGER_STREAM, ledger_stream.drained_key())
        connection.close()


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_not_ready_on_a_redis_that_would_lose_the_stream(
    gateway: Gateway, settings: Any, tmp_path: Path
) -> None:
    volatile = RedisProcess(free_port())
    persistent = RedisProcess(free_port(), tmp_path)
    volatile.start()
    persistent.start()
    try:
        settings.REDIS_URL = volatile.url
        report = asyncio.run(gateway.readiness.report())
        assert report["status"] == "unavailable"
        assert "appendonly yes" in report["redis"]["persistence_problem"]
        assert any("append-only" in w for w in report["warnings"])
        gateway.readiness._report = None
        asyncio.run(gateway.readiness.close())
        settings.REDIS_URL = persistent.url
        report = asyncio.run(gateway.readiness.report())
        assert "persistence_problem" not in report["redis"]
        assert report["status"] != "unavailable", report
        # The worker's own check at its start says the same.
        for server, expected in ((volatile, "appendonly=no"), (persistent, None)):
            connection = redis_lib.Redis.from_url(server.url)
            problem = ledger_stream.check_persistence(connection)
            connection.close()
            assert (problem is not None and expected in problem) if expected else problem is None
    finally:
        volatile.stop()
        persistent.stop()


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("persistence", ["append-only file", "none"])
def test_shipped_events_survive_a_redis_restart(
    settings: Any, tmp_path: Path, redis_url: str, persistence: str
) -> None:
    """Shipped to the stream, no worker running, Redis SIGKILLed at once and restarted: a
    worker then writes every row. With the append-only file the README requires, Redis keeps
    what it had persisted; what it acknowledged but had not yet written (everysec: up to a
    second or two) the gateway ships again, seeing Redis's new run id. Without persistence at
    all, the same retention covers a restart within LEDGER_SHIPPED_RETENTION_SECONDS."""
    from accounts.services import create_api_key, get_or_create_user

    directory = tmp_path / "redis" if persistence != "none" else None
    if directory is not None:
        directory.mkdir()
    server = RedisProcess(free_port(), directory)
    server.start()
    settings.REDIS_URL = server.url
    settings.LEDGER_STREAM = f"test-durable-{uuid.uuid4().hex[:8]}"
    user, _ = get_or_create_user("내구성")
    key, _ = create_api_key(user, actor=None)
    writer = LedgerWriter(flush_seconds=3600, max_pending=10_000, spool_dir=tmp_path / "spool")
    try:
        for event in events(50):
            event.user_id, event.api_key_id = user.pk, key.pk
            writer.record(event)
        assert writer.flush() == 50
        assert not list((tmp_path / "spool").glob("*.ready"))  # shipped, kept as .shipped
        server.stop()  # SIGKILL, right after the XADDs were acknowledged
        server.start()
        writer.flush()  # the writer's next tick: a new run id, so it ships again
        assert ledger_stream.drain() >= 50
        assert UsageRecord.objects.filter(user=user).count() == 50
    finally:
        writer.close()
        server.stop()


@pytest.mark.django_db(transaction=True)
def test_lifespan_shutdown_ships_the_spool_and_stops_the_writer(
    gateway: Gateway, settings: Any
) -> None:
    from accounts.services import create_api_key, get_or_create_user

    settings.REDIS_URL = ""
    user, _ = get_or_create_user("종료")
    key, _ = create_api_key(user, actor=None)

    async def serve_then_stop() -> list[str]:
        inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        sent: list[str] = []
        started = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])
            if message["type"] == "lifespan.startup.complete":
                started.set()

        server = asyncio.ensure_future(gateway({"type": "lifespan"}, inbox.get, send))
        await inbox.put({"type": "lifespan.startup"})
        await asyncio.wait_for(started.wait(), 30)
        for event in events(7):
            event.user_id, event.api_key_id = user.pk, key.pk
            gateway.ledger.record(event)
        await inbox.put({"type": "lifespan.shutdown"})
        await server
        return sent

    assert asyncio.run(serve_then_stop())[-1] == "lifespan.shutdown.complete"
    assert UsageRecord.objects.filter(user=user).count() == 7
    assert gateway.ledger._thread is None and gateway.ledger._spool is None
    mine = f"~{os.getpid()}~"
    assert not [p for p in Path(settings.LEDGER_SPOOL_DIR).glob("*.lock") if mine in p.name]


async def ready_and_series(gateway: Gateway) -> tuple[dict[str, Any], dict[str, float]]:
    """The readiness report, and /metrics' samples by name and labels: `name{label=value}`
    (the registry is the process's: other tests' series are there too)."""
    transport = httpx2.ASGITransport(app=gateway)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as http:
        report = (await http.get("/health/ready", headers=headers)).json()
        text = (await http.get("/metrics", headers=headers)).text
    series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            series[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return report, series


@pytest.mark.django_db(transaction=True)
def test_readiness_and_failed_quota_alerts_are_exported_as_gauges(
    gateway: Gateway, settings: Any, upstream: str, django_user_model: Any
) -> None:
    """What the alert rules watch (deploy/prometheus/alerts.yml): readiness, each upstream, the
    database, and the quota alerts that could not be sent in the last hour."""
    from django.utils import timezone

    from quotas.models import AlertWindow, DeliveryStatus, QuotaAlert, QuotaAlertDelivery

    settings.REDIS_URL = ""
    user = django_user_model.objects.create(username=f"gauges-{uuid.uuid4().hex[:6]}")
    alert = QuotaAlert.objects.create(
        user=user, window=AlertWindow.TOKENS_PER_DAY, threshold_percent=80
    )
    now = timezone.now()
    for hours_ago, status in ((0.1, DeliveryStatus.FAILED), (0.2, DeliveryStatus.SENT),
                              (3, DeliveryStatus.FAILED)):  # fmt: skip
        QuotaAlertDelivery.objects.create(
            alert=alert, period_start=now - timedelta(hours=hours_ago),
            created_at=now - timedelta(hours=hours_ago), channel="email", status=status,
        )  # fmt: skip
    report, values = asyncio.run(ready_and_series(gateway))
    assert report["status"] in ("ok", "degraded")
    assert values["gateway_ready"] == 1
    assert values[f"gateway_upstream_up{{upstream={upstream}}}"] == 1
    assert values["gateway_database_up"] == 1
    assert values["gateway_quota_alert_failures"] == 1  # the one within the hour
    assert report["database"]["quota_alert_failures"] == 1


@pytest.mark.django_db(transaction=True)
def test_a_dead_upstream_and_a_redis_without_persistence_show_as_down(settings: Any) -> None:
    settings.GATEWAY_MONITORING_TOKEN = TOKEN
    settings.SGLANG_URL = f"http://127.0.0.1:{free_port()}"  # nobody listens
    redis_server = RedisProcess(free_port())  # no append-only file
    redis_server.start()
    settings.REDIS_URL = f"redis://127.0.0.1:{redis_server.port}/0"
    made = Gateway()
    try:
        report, values = asyncio.run(ready_and_series(made))
    finally:
        asyncio.run(made.close())
        redis_server.stop()
    assert report["status"] == "unavailable"
    assert values["gateway_ready"] == 0
    assert values[f"gateway_upstream_up{{upstream={settings.SGLANG_URL}}}"] == 0
    assert values["gateway_redis_up"] == 0
