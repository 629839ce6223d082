"""`read_live_state`: what a Django view reads of the limiter, embedded and on Redis, from any
thread and without an event loop; admitted through the gateway's own GatewayLimiter."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from gateway.limits import (
    GatewayLimiter,
    key_scope,
    read_live_state,
    shared_backend,
    user_scope,
    user_scopes,
)
from quotas.services import KeyGrant
from tests.procs import free_port
from tokenlimit.limiter import LimiterUnavailable, Limits, ScopeReading
from tokenlimit.limiter_memory import MemoryBackend

USER_LIMITS = Limits(10, 10_000, 50_000, 100_000, 0, 5)
KEY_LIMITS = Limits(0, 1000, 0, 0, 0, 2)
T = TypeVar("T")


class FixedClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def grant(key_limits: Limits | None = KEY_LIMITS) -> KeyGrant:
    # The embedded backend lives as long as the test process: a user of this test only.
    return KeyGrant(
        key_id=random.randrange(1, 2**31),
        user_id=random.randrange(2**40, 2**50),
        username="state",
        limits=USER_LIMITS,
        key_limits=key_limits,
        expires_at=None,
        revoked=False,
    )


@dataclass
class Admitting:
    """The gateway's limiter on its own event loop, as in the gateway, with a fixed clock."""

    gateway: GatewayLimiter
    clock: FixedClock
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


@contextmanager
def admitting() -> Iterator[Admitting]:
    clock = FixedClock()
    made = Admitting(GatewayLimiter(shared_backend(), clock), clock, asyncio.new_event_loop())
    try:
        yield made
    finally:
        made.run(made.gateway.close())
        made.run(asyncio.sleep(0))  # lets the cancelled lease renewer finish
        made.loop.close()


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def backend_mode(request: pytest.FixtureRequest, settings: Any) -> str:
    if request.param == "redis":
        use_redis(settings, request.getfixturevalue("redis_url"))
    else:
        settings.REDIS_URL = ""
    return str(request.param)


def use_redis(settings: Any, url: str) -> None:
    settings.REDIS_URL = url
    settings.LIMITER_REDIS_PREFIX = f"test-state-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def limiter(backend_mode: str) -> Iterator[Admitting]:
    with admitting() as made:
        yield made


def in_other_thread(call: Callable[[], T]) -> T:
    """Run `call` in a fresh thread, as a Django view runs in a worker thread: no event loop."""

    def checked() -> T:
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()
        return call()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(checked).result(timeout=30)


def test_read_from_another_thread_shows_what_the_gateway_admitted(
    limiter: Admitting,
) -> None:
    gateway, clock = limiter.gateway, limiter.clock
    who = grant()
    limiter.run(gateway.admit(who, "r1", 300, "m"))
    clock.now += 5
    decision = limiter.run(gateway.admit(who, "r2", 200, "m"))
    assert decision is not None
    scopes = gateway.scopes(who)
    user, key = in_other_thread(lambda: read_live_state(scopes, now=clock.now))
    assert (user.key, key.key) == (f"u:{who.user_id}", f"u:{who.user_id}:k:{who.key_id}")
    assert (user.used_requests, user.used_tokens, user.used_tokens_day) == (2, 500, 500)
    assert (user.state.remaining_requests, user.state.remaining_tokens) == (8, 9500)
    assert (user.in_flight, user.max_parallel) == (2, 5)
    assert (key.used_tokens, key.state.remaining_tokens, key.in_flight) == (500, 500, 2)
    # The tightest window is the key's: the headers of the last admission said the same.
    assert key.state.remaining_tokens == decision.state.remaining_tokens
    assert key.state.reset_tokens == pytest.approx(decision.state.reset_tokens, abs=1e-5)

    limiter.run(gateway.settle(who, "r1", 100))
    [user_after] = read_live_state(scopes[:1], now=clock.now)  # this thread: no loop either
    assert (user_after.used_tokens, user_after.in_flight) == (300, 1)


def test_read_with_the_system_clock(limiter: Admitting) -> None:
    gateway = limiter.gateway
    who = grant(key_limits=None)
    limiter.run(gateway.admit(who, "r1", 42, "m"))
    [reading] = in_other_thread(lambda: read_live_state(gateway.scopes(who)))
    assert (reading.used_tokens, reading.used_tokens_day, reading.in_flight) == (42, 42, 1)
    assert 0 < reading.state.reset_tokens <= 60


def test_reads_from_many_threads_at_once(limiter: Admitting) -> None:
    gateway, clock = limiter.gateway, limiter.clock
    who = grant()
    limiter.run(gateway.admit(who, "r1", 7, "m"))
    scopes = gateway.scopes(who)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: read_live_state(scopes, now=clock.now), range(32)))
    assert {tuple(r.used_tokens for r in readings) for readings in results} == {(7, 7)}


def test_an_empty_user_reads_as_untouched(backend_mode: str) -> None:
    scopes = user_scopes(random.randrange(2**40, 2**50), USER_LIMITS)
    [reading] = read_live_state(scopes)
    assert isinstance(reading, ScopeReading)
    assert (reading.used_tokens, reading.state.remaining_tokens, reading.in_flight) == (
        0,
        10_000,
        0,
    )


def test_embedded_reads_the_gateways_own_backend(settings: Any) -> None:
    settings.REDIS_URL = ""
    backend = shared_backend()
    assert isinstance(backend, MemoryBackend)
    assert shared_backend() is backend
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(shared_backend())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(made is backend for made in seen)


@pytest.mark.django_db
def test_the_gateway_uses_the_shared_backend(settings: Any) -> None:
    from gateway.app import Gateway

    settings.REDIS_URL = ""
    gateway = Gateway()
    try:
        assert gateway.limits.backend is shared_backend()
    finally:
        asyncio.run(gateway.close())


@pytest.mark.redis
def test_redis_down_is_reported_within_the_connect_timeout(redis_url: str, settings: Any) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings.LIMITER_REDIS_CONNECT_TIMEOUT = 0.5
    scopes = user_scopes(1, USER_LIMITS)
    started = time.monotonic()
    with pytest.raises(LimiterUnavailable):
        in_other_thread(lambda: read_live_state(scopes))
    assert time.monotonic() - started < 0.5


@pytest.mark.redis
def test_redis_reads_use_the_async_backends_keys(redis_url: str, settings: Any) -> None:
    use_redis(settings, redis_url)
    with admitting() as limiter:
        who = grant(key_limits=None)
        limiter.run(limiter.gateway.admit(who, "r1", 11, "m"))
        scopes = limiter.gateway.scopes(who)
        assert read_live_state(scopes, now=limiter.clock.now)[0].used_tokens == 11
        settings.LIMITER_REDIS_PREFIX = f"other-{uuid.uuid4().hex[:10]}"
        assert read_live_state(scopes, now=limiter.clock.now)[0].used_tokens == 0


def test_user_scopes_are_the_scopes_admission_counts() -> None:
    with_key, without_key = grant(), grant(key_limits=None)
    limiter = GatewayLimiter(MemoryBackend())
    assert user_scopes(
        with_key.user_id, USER_LIMITS, [(with_key.key_id, KEY_LIMITS)]
    ) == limiter.scopes(with_key)
    assert user_scopes(without_key.user_id, USER_LIMITS) == limiter.scopes(without_key)
    assert user_scopes(7, USER_LIMITS, [(3, KEY_LIMITS), (4, USER_LIMITS)]) == [
        user_scope(7, USER_LIMITS),
        key_scope(7, 3, KEY_LIMITS),
        key_scope(7, 4, USER_LIMITS),
    ]
    assert [scope.key for scope in user_scopes(7, USER_LIMITS, [(3, KEY_LIMITS)])] == [
        "u:7",
        "u:7:k:3",
    ]
