"""`GET /health`: the state of the gateway, the upstream, the database and Redis."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from django.conf import settings
from django.db import connection

from gateway.caches import run_db

if TYPE_CHECKING:
    from gateway.app import Gateway

CHECK_TIMEOUT = 2.0
LEDGER_BACKLOG_WARNING = 10_000


async def report(gateway: Gateway) -> dict[str, Any]:
    database, redis_state = await asyncio.gather(_database(), report_redis())
    try:
        models = await asyncio.wait_for(gateway.catalog.models(), CHECK_TIMEOUT)
    except Exception:
        models = gateway.catalog.snapshot()
    upstreams = sorted({m.upstream_url for m in models} or {settings.SGLANG_URL})
    upstream_states = await asyncio.gather(*(_upstream(gateway, url) for url in upstreams))
    warnings = []
    if redis_state.get("ledger_stream_backlog", 0) > LEDGER_BACKLOG_WARNING:
        warnings.append(
            f"{redis_state['ledger_stream_backlog']} usage events wait in the ledger stream: "
            "are Celery workers (`celery -A limiter_site worker`) and the database up?"
        )
    if gateway.ledger.pending > LEDGER_BACKLOG_WARNING:
        warnings.append(f"{gateway.ledger.pending} usage events wait in this gateway's queue")
    if not models:
        warnings.append("no served models configured: run `manage.py import_config config/*.yaml`")
    # One model's GPU being down must not pull the whole gateway out of a load balancer: it
    # serves while its own dependencies are up and at least one upstream answers.
    serving = (
        database["ok"] and redis_state["ok"] is not False and any(u["ok"] for u in upstream_states)
    )
    if not serving:
        status = "unavailable"
    elif all(u["ok"] for u in upstream_states) and models:
        status = "ok"
    else:
        status = "degraded"
    return {
        "status": status,
        "gateway": {
            "in_flight": gateway.stats.in_flight,
            "ledger_pending": gateway.ledger.pending,
            "ledger_dropped": gateway.ledger.dropped,
        },
        "upstreams": upstream_states,
        "database": database,
        "redis": redis_state,
        "models": [
            {
                "name": m.name,
                "aliases": list(m.aliases),
                "token_counter": gateway.counters.source(m),
            }
            for m in models
        ],
        "warnings": warnings,
    }


async def _timed(check: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check, CHECK_TIMEOUT)
    except Exception as exc:
        return {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:300]}
    result = {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
    if isinstance(detail, dict):
        result.update(detail)
    return result


async def _database() -> dict[str, Any]:
    def ping() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    state = await _timed(run_db(ping))
    return {"vendor": connection.vendor, **state}


async def report_redis() -> dict[str, Any]:
    if not settings.REDIS_URL:
        return {"ok": None, "mode": "embedded (REDIS_URL not set)"}
    import redis.asyncio as aioredis

    async def ping() -> dict[str, Any]:
        client = aioredis.Redis.from_url(settings.REDIS_URL, socket_timeout=CHECK_TIMEOUT)
        try:
            await client.ping()
            # Usage events appended by gateways and not yet written by a Celery worker.
            return {"ledger_stream_backlog": int(await client.xlen(settings.LEDGER_STREAM))}
        finally:
            await client.aclose()

    return await _timed(ping())


async def _upstream(gateway: Gateway, url: str) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT)
        async with gateway.upstream.session().get(f"{url}/health", timeout=timeout) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            return {}

    return {"url": url, **(await _timed(get()))}
