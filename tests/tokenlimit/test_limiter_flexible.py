"""Flexible admission (a request without max_tokens): reserve what the windows still allow, at
most the default and at least a floor, atomically, on both backends."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.procs import busy_cores
from tests.tokenlimit.test_limiter_contract import SEOUL, T0, Harness, limits, make
from tokenlimit.limiter import TOKENS, TOKENS_DAY, TOO_LARGE, Day, Decision, Scope

__all__ = ["make"]  # the backend fixture, memory and Redis


def flexible(h: Harness, tokens: int, floor: int, at: float) -> tuple[Decision, str]:
    rid = uuid.uuid4().hex
    decision = h.loop.run_until_complete(
        h.backend.admit(h.scopes, rid, tokens, at, 60.0, Day.at(at, SEOUL), floor)
    )
    return decision, rid


def test_it_reserves_what_the_minute_window_still_allows(make: Any) -> None:
    h = make(limits(tokens_per_minute=1000))
    assert h.admit(600, T0).admitted

    decision, _ = flexible(h, 4200, 50, T0 + 1)

    assert decision.admitted and decision.requested == 400
    assert decision.state.remaining_tokens == 0


def test_it_takes_the_default_when_the_windows_allow_it(make: Any) -> None:
    h = make(limits(tokens_per_minute=100_000, tokens_per_day=1_000_000))
    decision, _ = flexible(h, 4200, 50, T0)
    assert decision.admitted and decision.requested == 4200


def test_no_token_limit_means_the_default(make: Any) -> None:
    h = make(limits(requests_per_minute=10))
    decision, _ = flexible(h, 4200, 50, T0)
    assert decision.admitted and decision.requested == 4200


def test_the_tightest_window_of_user_and_key_decides(make: Any) -> None:
    h = make(
        limits(tokens_per_minute=5000, tokens_per_hour=3000, tokens_per_day=2500),
        limits(tokens_per_minute=2000),
    )
    assert h.admit(300, T0).admitted
    decision, _ = flexible(h, 4200, 50, T0 + 1)
    assert decision.admitted and decision.requested == 1700  # the key's minute: 2000 − 300


def test_below_the_floor_it_is_an_honest_429_not_too_large(make: Any) -> None:
    h = make(limits(tokens_per_minute=1000))
    assert h.admit(980, T0).admitted

    refused, _ = flexible(h, 4200, 50, T0 + 10)

    assert (refused.admitted, refused.kind) == (False, TOKENS)
    assert refused.requested == 50 and refused.retry_after == pytest.approx(50.0)
    assert flexible(h, 4200, 50, T0 + 60)[0].requested == 1000  # the 980 left the window


def test_a_floor_larger_than_a_window_is_too_large(make: Any) -> None:
    h = make(limits(tokens_per_minute=1000))
    refused, _ = flexible(h, 4200, 1200, T0)
    assert (refused.admitted, refused.kind) == (False, TOO_LARGE)


def test_the_daily_quota_bounds_it_too(make: Any) -> None:
    h = make(limits(tokens_per_day=1000))
    assert h.admit(900, T0).admitted
    assert flexible(h, 4200, 50, T0 + 1)[0].requested == 100
    refused, _ = flexible(h, 4200, 50, T0 + 2)
    assert refused.kind == TOKENS_DAY


def test_settling_a_flexible_reservation_refunds_like_any_other(make: Any) -> None:
    h = make(limits(tokens_per_minute=1000))
    decision, rid = flexible(h, 4200, 50, T0)
    assert decision.requested == 1000
    h.settle(rid, 300, T0 + 1)
    assert flexible(h, 4200, 50, T0 + 2)[0].requested == 700


@pytest.mark.redis
def test_concurrent_flexible_admissions_never_overshoot_on_a_loaded_machine() -> None:
    """Many gateways' requests at once, each taking "what is left": together they never take
    more than the window, and no one is refused while the floor still fits."""
    from django.conf import settings

    from tokenlimit.limiter_redis import RedisBackend

    window, floor = 3000, 20
    scopes = [Scope(f"u:{uuid.uuid4().hex[:12]}", limits(tokens_per_minute=window))]

    async def run() -> list[Decision]:
        backends = [RedisBackend(settings.REDIS_URL, 2.0) for _ in range(4)]
        day = Day.at(T0, SEOUL)
        try:
            return list(
                await asyncio.gather(
                    *(
                        backends[n % 4].admit(scopes, uuid.uuid4().hex, 500, T0, 60.0, day, floor)
                        for n in range(60)
                    )
                )
            )
        finally:
            for backend in backends:
                await backend.close()

    with busy_cores():
        decisions = asyncio.run(run())

    admitted = [d.requested for d in decisions if d.admitted]
    assert sum(admitted) <= window  # never past the window
    assert all(n >= floor for n in admitted)
    # Refused only once less than the floor was left: the window is used up to that.
    assert window - sum(admitted) < floor
    assert all(d.kind == TOKENS for d in decisions if not d.admitted)


@pytest.mark.redis
def test_backends_agree_on_flexible_admissions() -> None:
    import random

    from django.conf import settings

    from tokenlimit.limiter_memory import MemoryBackend
    from tokenlimit.limiter_redis import RedisBackend

    rng = random.Random(13)
    shape = limits(tokens_per_minute=3000, tokens_per_hour=9000, tokens_per_day=20_000)
    memory = Harness(MemoryBackend(), shape)
    redis_h = Harness(RedisBackend(settings.REDIS_URL, 2.0), shape)
    redis_h.scopes = [Scope(memory.scopes[0].key, shape)]
    now, open_rids = T0, list[str]()
    for _ in range(200):
        now += rng.choice([0.0, 1.0, 5.0, 20.0])
        if open_rids and rng.random() < 0.4:
            rid, used = open_rids.pop(0), rng.randrange(0, 800)
            memory.settle(rid, used, now)
            redis_h.settle(rid, used, now)
            continue
        rid, tokens, floor = uuid.uuid4().hex, rng.randrange(100, 2000), rng.randrange(1, 100)
        day = Day.at(now, SEOUL)
        a = memory.loop.run_until_complete(
            memory.backend.admit(memory.scopes, rid, tokens, now, 60.0, day, floor)
        )
        b = redis_h.loop.run_until_complete(
            redis_h.backend.admit(redis_h.scopes, rid, tokens, now, 60.0, day, floor)
        )
        assert (a.admitted, a.kind, a.requested) == (b.admitted, b.kind, b.requested)
        if a.admitted:
            open_rids.append(rid)
    redis_h.loop.run_until_complete(redis_h.backend.close())


def test_concurrent_flexible_admissions_in_memory_never_overshoot_on_a_loaded_machine() -> None:
    """The in-memory twin, from many threads at once (a gateway's worker threads and its event
    loop): the same guarantee as Redis, held by the backend's lock."""
    from concurrent.futures import ThreadPoolExecutor

    from tokenlimit.limiter_memory import MemoryBackend

    window, floor = 3000, 20
    backend = MemoryBackend()
    scopes = [Scope(f"u:{uuid.uuid4().hex[:12]}", limits(tokens_per_minute=window))]
    day = Day.at(T0, SEOUL)

    def one(_: int) -> Decision:
        return asyncio.run(backend.admit(scopes, uuid.uuid4().hex, 500, T0, 60.0, day, floor))

    with busy_cores(), ThreadPoolExecutor(max_workers=8) as pool:
        decisions = list(pool.map(one, range(60)))

    admitted = [d.requested for d in decisions if d.admitted]
    assert sum(admitted) <= window
    assert all(n >= floor for n in admitted)
    assert window - sum(admitted) < floor
    assert all(d.kind == TOKENS for d in decisions if not d.admitted)
