"""A request's CPU work happens off the event loop, and a long prompt does not hold the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx2
import pytest

from gateway.caches import ModelInfo
from gateway.counting import BULK_BYTES, Counters, FairPool
from gateway.preparation import UpstreamTarget, prepare
from gateway.request_schema import CHAT, Context
from quotas.request_policy import RequestAccess
from tokenlimit.tokens import get_counter

MODEL = ModelInfo(
    name="Qwen/Qwen2.5-7B-Instruct", aliases=(), upstream_url="http://x", tokenizer="",
    context_length=32768, korean_factor=None, request_timeout=30.0,
)  # fmt: skip
TARGET = UpstreamTarget(MODEL.name, None, "r", RequestAccess())


def prepared_on(text: str) -> tuple[int, str]:
    body = {"model": MODEL.name, "messages": [{"role": "user", "content": text}]}
    seen: list[str] = []

    def spy(*args: object) -> object:
        seen.append(threading.current_thread().name)
        return prepare(*args)

    async def scenario() -> int:
        counters = Counters()
        counter = await counters.get(MODEL)
        ctx = Context(vocab_size=counter.vocab_size)
        size = len(text.encode())
        result = await counters.prepare(size, 1, spy, CHAT, body, ctx, counter, 32768, TARGET)
        return result.prompt_tokens

    return asyncio.run(scenario()), seen[0]


def test_a_short_prompt_is_prepared_on_the_small_pool() -> None:
    count, thread = prepared_on("안녕하세요, 반갑습니다.")
    assert thread.startswith("prepare_")
    assert count == get_counter(MODEL.name).count_chat(
        [{"role": "user", "content": "안녕하세요, 반갑습니다."}]
    )


def test_a_long_prompt_is_prepared_on_the_bulk_pool() -> None:
    text = "서울의 가을 하늘은 높고 푸르다. " * 3000  # about 54,000 characters
    assert len(text.encode()) > BULK_BYTES
    count, thread = prepared_on(text)
    assert thread.startswith("prepare-bulk")
    assert count == get_counter(MODEL.name).count_chat([{"role": "user", "content": text}])


def test_counting_a_huge_prompt_leaves_the_event_loop_running() -> None:
    """Tokenizing releases the GIL: the loop ticks on while 750,000 characters are counted.
    (Through the tokenizer's `encode` the loop stood still for the whole count.)"""
    counter = get_counter(MODEL.name)
    text = "한국어 문장입니다. 오늘은 날씨가 좋습니다. " * 30_000

    async def scenario() -> tuple[float, float]:
        lags: list[float] = []

        async def ticker() -> None:
            while True:
                started = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - started)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.05)
        lags.clear()
        started = time.perf_counter()
        await Counters().run(1, BULK_BYTES + 1, counter.count_text, text)
        took = time.perf_counter() - started
        task.cancel()
        return max(lags), took

    worst_lag, took = asyncio.run(scenario())
    # Relative to the work itself, so a loaded machine scales both: held, the ratio is ~1.
    assert worst_lag < 0.3 * took, (worst_lag, took)


@pytest.mark.django_db(transaction=True)
def test_a_model_edit_changes_the_count_without_a_restart(settings: Any) -> None:
    """Editing a model's Korean factor (or tokenizer) in the admin reaches a running gateway
    within the key-cache interval: counters are cached by everything that changes a count."""
    from gateway.app import Gateway
    from gateway.models import ServedModel
    from tests.gateway.conftest import make_user

    settings.REDIS_URL = ""
    settings.GATEWAY_KEY_CACHE_SECONDS = 0.2
    served = ServedModel.objects.create(
        name="estimated-ko", tokenizer="", korean_factor=1.0, upstream_url="http://127.0.0.1:9"
    )
    _, key = make_user("모델편집")
    gateway = Gateway()
    body = {"model": "estimated-ko", "prompt": "한국어 문장의 토큰 수를 셉니다. " * 20}

    async def count() -> int:
        transport = httpx2.ASGITransport(app=gateway)
        async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as http:
            response = await http.post(
                "/v1/tokenize", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200, response.text
            return int(response.json()["count"])

    async def scenario() -> tuple[int, int]:
        before = await count()
        await asyncio.to_thread(ServedModel.objects.filter(pk=served.pk).update, korean_factor=2.0)
        deadline = time.monotonic() + 10
        after = before
        while after == before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            after = await count()
        await gateway.close()
        return before, after

    before, after = asyncio.run(scenario())
    assert after > 1.5 * before, (before, after)


@pytest.mark.parametrize(
    ("text", "pool"), [("짧은 답변입니다.", "prepare_"), ("긴 답변. " * 9000, "prepare-bulk")]
)
def test_generated_text_is_counted_like_prompts(text: str, pool: str, monkeypatch) -> None:
    counter = get_counter(MODEL.name)
    threads: list[str] = []
    real = counter.count_completion

    def spy(value: str) -> int:
        threads.append(threading.current_thread().name)
        return real(value)

    monkeypatch.setattr(counter, "count_completion", spy)
    assert asyncio.run(Counters().count_completion(1, MODEL, text)) == counter.count_text(text)
    assert threads[0].startswith(pool)


def test_a_pool_serves_users_in_turn_not_first_come_first_served() -> None:
    """User 1 queues five slow jobs, then user 2 one: user 2's runs after at most one more of
    user 1's, not after all of them."""
    pool = FairPool(1, "fair-test")
    started: list[str] = []
    gate = threading.Event()

    def job(name: str) -> None:
        started.append(name)
        if name == "a1":
            gate.wait(10)

    async def scenario() -> None:
        first = asyncio.ensure_future(pool.run(1, job, "a1"))
        await asyncio.sleep(0.05)  # a1 holds the only thread
        rest = [asyncio.ensure_future(pool.run(1, job, f"a{i}")) for i in range(2, 6)]
        await asyncio.sleep(0.01)
        other = asyncio.ensure_future(pool.run(2, job, "b1"))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *rest, other)

    asyncio.run(scenario())
    assert started == ["a1", "a2", "b1", "a3", "a4", "a5"]


def test_a_cancelled_wait_gives_its_turn_away() -> None:
    pool = FairPool(1, "fair-cancel")
    gate = threading.Event()

    async def scenario() -> str:
        holder = asyncio.ensure_future(pool.run(1, gate.wait, 10))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(pool.run(2, str, "never"))
        await asyncio.sleep(0.01)
        waiting.cancel()  # the client went away while queued
        gate.set()
        await holder
        return await asyncio.wait_for(pool.run(3, str, "next"), 5)

    assert asyncio.run(scenario()) == "next"


def test_a_user_holds_at_most_its_share_of_threads() -> None:
    """Two threads, one per user: user 1's second job waits while user 2's runs beside its
    first, although a thread would be free for it."""
    pool = FairPool(2, "fair-cap", per_user=1)
    running: list[str] = []
    gate = threading.Event()

    def job(name: str) -> None:
        running.append(name)
        gate.wait(10)

    async def scenario() -> list[str]:
        jobs = [asyncio.ensure_future(pool.run(1, job, "a1"))]
        await asyncio.sleep(0.05)
        jobs.append(asyncio.ensure_future(pool.run(1, job, "a2")))
        await asyncio.sleep(0.05)
        seen_alone = list(running)
        jobs.append(asyncio.ensure_future(pool.run(2, job, "b1")))
        await asyncio.sleep(0.05)
        seen = [*seen_alone, "|", *running]
        gate.set()
        await asyncio.gather(*jobs)
        return seen

    assert asyncio.run(scenario()) == ["a1", "|", "a1", "b1"]
