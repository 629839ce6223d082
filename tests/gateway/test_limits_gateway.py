"""Limits as clients see them: 429 bodies, headers, and the `openai` SDK's own retry.

The gateway runs in process (its ASGI app behind httpx2's ASGITransport, the SDK's own HTTP
library) with an injected clock, in front of a real simulator process. The SDK's retry sleep
advances that clock by exactly what the SDK chose to wait, so "waits exactly as long as
needed" is tested without a minute of real waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from gateway.app import Gateway
from tests.gateway.conftest import FAST_MODEL, make_user
from tests.procs import simulator

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHAT = [{"role": "user", "content": "안녕하세요, 반갑습니다."}]


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with simulator(FAST_MODEL, tokens_per_second=0, ttft_ms=0) as url:
        yield url


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend_setting(request: pytest.FixtureRequest, settings: Any) -> str:
    if request.param == "redis":
        if not settings.REDIS_URL:
            from tests.conftest import _missing

            _missing("needs REDIS_URL=redis://…")
        # Fresh counters: user ids restart with every test database, Redis does not.
        settings.LIMITER_REDIS_PREFIX = f"test-{uuid.uuid4().hex[:8]}"
    else:
        settings.REDIS_URL = ""
    return str(request.param)


@pytest.fixture
def served(upstream: str, backend_setting: str) -> None:
    from gateway.models import ServedModel

    ServedModel.objects.create(name=FAST_MODEL, aliases=["korean-qwen"], upstream_url=upstream)


@pytest.fixture
def make_gateway() -> Iterator[Any]:
    made: list[Gateway] = []

    def factory(clock: FakeClock) -> Gateway:
        made.append(Gateway(clock=clock))
        return made[-1]

    yield factory
    for gateway in made:
        run(gateway.close())  # ships the ledger before the test database goes away


def client_for(gateway: Gateway, key: str, clock: FakeClock, **kwargs: Any) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gateway), base_url="http://gw")
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=key, http_client=http, **kwargs)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_openai_sdk_retry_waits_exactly_as_long_as_needed(
    served: None, make_gateway: Any, monkeypatch
) -> None:
    _, key = make_user("재시도", requests_per_minute=2, cooldown_minutes=0)
    clock = FakeClock()
    gateway = make_gateway(clock)
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(openai._base_client.anyio, "sleep", fake_sleep)

    async def scenario() -> Any:
        client = client_for(gateway, key, clock, max_retries=2)
        for _ in range(2):
            await client.chat.completions.create(model="korean-qwen", messages=CHAT, max_tokens=3)
            clock.now += 10
        started = clock.now
        raw = await client.chat.completions.with_raw_response.create(
            model="korean-qwen", messages=CHAT, max_tokens=3
        )
        return raw, clock.now - started

    raw, waited = run(scenario())
    assert raw.retries_taken == 1
    assert waits == [pytest.approx(40.0, abs=0.001)]  # the first request leaves the window then
    assert waited == pytest.approx(40.0, abs=0.001)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"


def test_retry_after_is_not_a_moment_too_early(served: None, make_gateway: Any) -> None:
    _, key = make_user("정확", tokens_per_minute=100, cooldown_minutes=0)
    clock = FakeClock()
    gateway = make_gateway(clock)

    async def scenario() -> tuple[Any, Any, Any]:
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gateway), base_url="http://gw")
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "korean-qwen", "messages": CHAT, "max_tokens": 60}
        first = await http.post("/v1/chat/completions", json=body, headers=headers)
        clock.now += 5
        refused = await http.post("/v1/chat/completions", json=body, headers=headers)
        wait = float(refused.headers["retry-after-ms"]) / 1000
        clock.now += wait - 0.01
        early = await http.post("/v1/chat/completions", json=body, headers=headers)
        clock.now += 0.01
        on_time = await http.post("/v1/chat/completions", json=body, headers=headers)
        return first, refused, (early, on_time, wait)

    first, refused, (early, on_time, wait) = run(scenario())
    assert first.status_code == 200
    assert refused.status_code == 429 and early.status_code == 429
    assert on_time.status_code == 200
    error = refused.json()["error"]
    assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    used = first.json()["usage"]["total_tokens"]
    assert error["message"].startswith(
        f"Rate limit reached for korean-qwen on tokens per min (TPM): Limit 100, Used {used}, "
    )
    assert "Please try again in" in error["message"]
    assert wait == pytest.approx(55.0, abs=0.002)
    assert refused.headers["retry-after"] == "55"
    assert refused.headers["x-should-retry"] == "true"
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(100 - used)


def test_request_too_large_for_the_window_is_refused_at_once(
    served: None, make_gateway: Any
) -> None:
    _, key = make_user("너무큼", tokens_per_minute=50)
    gateway = make_gateway(FakeClock())

    async def scenario() -> Any:
        client = client_for(gateway, key, FakeClock(), max_retries=3)
        return await client.chat.completions.create(
            model="korean-qwen", messages=CHAT, max_tokens=100
        )

    with pytest.raises(openai.RateLimitError) as caught:
        run(scenario())
    response = caught.value.response
    assert response.headers["x-should-retry"] == "false"
    assert "Request too large" in caught.value.message


def test_daily_quota_is_insufficient_quota_until_midnight(served: None, make_gateway: Any) -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    _, key = make_user("일일", tokens_per_day=200)
    clock = FakeClock()
    clock.now = datetime(2026, 11, 24, 23, 0, 0, tzinfo=ZoneInfo("Asia/Seoul")).timestamp()
    gateway = make_gateway(clock)

    async def scenario() -> Any:
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gateway), base_url="http://gw")
        headers = {"Authorization": f"Bearer {key}"}
        small = {"model": "korean-qwen", "messages": CHAT, "max_tokens": 5}
        assert (await http.post("/v1/chat/completions", json=small, headers=headers)).is_success
        body = {"model": "korean-qwen", "messages": CHAT, "max_tokens": 150}
        return await http.post("/v1/chat/completions", json=body, headers=headers)

    refused = run(scenario())
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "tokens_per_day"
    assert refused.headers["x-should-retry"] == "false"
    assert refused.headers["retry-after"] == "3600"


def test_streaming_success_carries_ratelimit_headers_and_settles_exactly(
    served: None, make_gateway: Any
) -> None:
    _, key = make_user("스트림", tokens_per_minute=1000, requests_per_minute=10)
    clock = FakeClock()
    gateway = make_gateway(clock)

    async def scenario() -> tuple[Any, Any]:
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gateway), base_url="http://gw")
        headers = {"Authorization": f"Bearer {key}"}
        body = {
            "model": "korean-qwen",
            "messages": CHAT,
            "max_tokens": 200,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        streamed = await http.post("/v1/chat/completions", json=body, headers=headers)
        plain = {"model": "korean-qwen", "messages": CHAT, "max_tokens": 1}
        after = await http.post("/v1/chat/completions", json=plain, headers=headers)
        return streamed, after

    streamed, after = run(scenario())
    assert streamed.headers["x-ratelimit-limit-tokens"] == "1000"
    usage_line = [
        line for line in streamed.text.splitlines() if '"usage": {' in line or '"usage":{' in line
    ][-1]
    used = json.loads(usage_line.removeprefix("data: "))["usage"]["total_tokens"]
    prompt_plus_one = after.json()["usage"]["prompt_tokens"] + 1
    # The 200-token reservation was replaced by what the stream really used.
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 1000 - used - prompt_plus_one
    assert after.headers["x-ratelimit-remaining-requests"] == "8"
