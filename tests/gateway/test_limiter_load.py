"""The limiter refuses only when Redis really is unavailable: a burst on a healthy Redis, with
every core kept busy by another process, gets no 503; a dead Redis gets 503s within the
documented bound; Redis back, the same gateway admits again."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.gateway.conftest import FAST_MODEL, database_url_for_subprocess, gateway_args, make_user
from tests.procs import RedisProcess, busy_cores, free_port, running, simulator

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

BODY = {
    "model": "korean-qwen",
    "messages": [{"role": "user", "content": "한 단어로 대답해 주세요."}],
    "max_tokens": 4,
}
CONNECT_TIMEOUT, REPLY_TIMEOUT = 0.5, 2.0


async def burst(url: str, key: str, count: int) -> list[tuple[int, float, str]]:
    """`count` requests released at once: (status, seconds, error code) each."""
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        gate = asyncio.Event()

        async def one() -> tuple[int, float, str]:
            await gate.wait()
            started = time.monotonic()
            async with session.post(
                f"{url}/v1/chat/completions", json=BODY, headers=headers
            ) as response:
                payload = await response.json(content_type=None)
                code = (payload.get("error") or {}).get("code") or ""
                return response.status, time.monotonic() - started, str(code)

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        await asyncio.sleep(0.2)
        gate.set()
        return await asyncio.gather(*tasks)


@pytest.fixture
def gateway_on(tmp_path: Path) -> Iterator[Any]:
    """Start a gateway (uvicorn) on a given Redis with a fast simulator; yields (url, key)."""
    with ExitStack() as stack:
        upstream = stack.enter_context(simulator(FAST_MODEL, tokens_per_second=0, ttft_ms=0))
        from gateway.models import ServedModel

        ServedModel.objects.create(name=FAST_MODEL, aliases=["korean-qwen"], upstream_url=upstream)
        _, key = make_user(
            f"부하-{uuid.uuid4().hex[:6]}", requests_per_minute=0, tokens_per_minute=0,
            tokens_per_hour=0, tokens_per_day=0, max_parallel_requests=0, cooldown_minutes=0,
        )  # fmt: skip

        def start(redis_url: str) -> str:
            port = free_port()
            env = {
                "DATABASE_URL": database_url_for_subprocess(),
                "REDIS_URL": redis_url,
                "LIMITER_REDIS_PREFIX": f"load-{uuid.uuid4().hex[:8]}",
                "LEDGER_SPOOL_DIR": str(tmp_path / "spool"),
                "LIMITER_REDIS_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
                "LIMITER_REDIS_REPLY_TIMEOUT": str(REPLY_TIMEOUT),
            }
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(running(gateway_args(port), f"{url}/health", env))
            return url

        yield start, key


def test_a_burst_on_a_busy_machine_gets_no_503(gateway_on: Any, redis_url: str) -> None:
    start, key = gateway_on
    url = start(redis_url)
    with busy_cores():
        results = asyncio.run(burst(url, key, 250))
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: 250}, Counter((s, code) for s, _, code in results)


def test_redis_dead_is_503_within_the_bound_and_recovers(gateway_on: Any, tmp_path: Path) -> None:
    start, key = gateway_on
    server = RedisProcess(free_port())
    server.start()
    try:
        url = start(server.url)
        assert {s for s, _, _ in asyncio.run(burst(url, key, 20))} == {200}
        server.stop()
        refused = asyncio.run(burst(url, key, 20))
        assert {(s, code) for s, _, code in refused} == {(503, "limiter_unavailable")}
        # Refused (connection refused: at once) well within connect + reply timeouts.
        assert max(seconds for _, seconds, _ in refused) < CONNECT_TIMEOUT + REPLY_TIMEOUT
        server.start()
        assert {s for s, _, _ in asyncio.run(burst(url, key, 20))} == {200}  # no restart
    finally:
        server.stop()
