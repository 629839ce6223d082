"""Two gateway processes (uvicorn) sharing one Redis, 200 concurrent requests from one user,
while another process keeps every core busy.

Nothing may overshoot: admitted tokens per 60 s ≤ TPM, admitted requests ≤ RPM, requests in
flight at the upstream ≤ the parallel cap; afterwards Redis's counters equal the ledger's sums.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import ExitStack
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import httpx
import pytest
import redis

from tests.gateway.conftest import FAST_MODEL, database_url_for_subprocess, gateway_args, make_user
from tests.procs import busy_cores, free_port, ledger_worker, running, simulator

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

TPM, RPM, PARALLEL = 3000, 60, 4
REQUESTS = 200
MESSAGES = [{"role": "user", "content": "짧게 대답해 주세요: 오늘 기분이 어때요?"}]


async def fire(urls: list[str], key: str) -> list[tuple[int, dict[str, str]]]:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "korean-qwen", "messages": MESSAGES, "max_tokens": 20}
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> tuple[int, dict[str, str]]:
            url = f"{urls[i % len(urls)]}/v1/chat/completions"
            async with session.post(url, json=body, headers=headers) as response:
                await response.read()
                return response.status, dict(response.headers)

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def test_two_gateways_never_overshoot_and_counters_match_the_ledger(redis_url: str) -> None:

    user, key = make_user(
        "동시성",
        tokens_per_minute=TPM,
        requests_per_minute=RPM,
        max_parallel_requests=PARALLEL,
        cooldown_minutes=0,
        tokens_per_hour=10**9,
        tokens_per_day=10**9,
    )
    prefix = f"conc-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        upstream = stack.enter_context(simulator(FAST_MODEL, tokens_per_second=400, ttft_ms=20))
        from gateway.models import ServedModel

        ServedModel.objects.create(name=FAST_MODEL, aliases=["korean-qwen"], upstream_url=upstream)
        env = {
            "DATABASE_URL": database_url_for_subprocess(),
            "REDIS_URL": redis_url,
            "LIMITER_REDIS_PREFIX": prefix,
            "GATEWAY_LEDGER_FLUSH_SECONDS": "0.1",
        }
        stack.enter_context(ledger_worker(env))
        urls = []
        for _ in range(2):
            port = free_port()
            stack.enter_context(running(gateway_args(port), f"http://127.0.0.1:{port}/health", env))
            urls.append(f"http://127.0.0.1:{port}")
        httpx.post(f"{upstream}/sim/reset", timeout=5)
        started = time.monotonic()
        # Another process keeps every core busy: the limiter must still refuse only by its
        # limits (a loaded machine once turned slow Redis replies into 503s here).
        with busy_cores():
            results = asyncio.run(fire(urls, key))
        elapsed = time.monotonic() - started
        stats = httpx.get(f"{upstream}/sim/stats", timeout=5).json()
        admitted = [headers for status, headers in results if status == 200]
        refused = [status for status, _ in results if status != 200]
        assert set(refused) <= {429}
        assert elapsed < 60, "the checks below assume every request fell in one minute"
        rows = wait_for_rows(user, len(results))

    billed = sum(r.prompt_tokens + r.completion_tokens for r in rows if r.status_code == 200)
    assert len(admitted) == sum(1 for r in rows if r.status_code == 200)
    assert 0 < len(admitted) <= RPM
    assert billed <= TPM
    assert stats["peak_running"] <= PARALLEL
    # Each 429 says why, with OpenAI's headers.
    kinds = {r.error_type for r in rows if r.status_code == 429}
    assert kinds <= {"tokens", "requests", "parallel_requests"}

    client = redis.Redis.from_url(redis_url)
    day = datetime.now(ZoneInfo("Asia/Seoul")).strftime("%Y%m%d")
    tag = f"{prefix}:{{u:{user.pk}}}"
    assert int(client.get(f"{tag}:d:{day}") or 0) == billed
    assert int(client.hget(f"{tag}:a", "tm") or 0) == billed
    assert client.zcard(f"{tag}:p") == 0  # every parallel slot was given back
    client.close()


def wait_for_rows(user: Any, expected: int, timeout: float = 15.0) -> list[Any]:
    from quotas.models import UsageRecord

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = list(UsageRecord.objects.filter(user=user))
        if len(rows) >= expected:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{len(rows)} ledger rows, expected {expected}")
