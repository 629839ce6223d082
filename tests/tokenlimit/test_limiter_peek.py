"""`peek` beyond the shared contract: the embedded peek against admission's own code on random
workloads, the Redis peek against the embedded one, Redis keys untouched by a peek, and the
embedded backend read from another thread while its event loop changes it.
"""

from __future__ import annotations

import asyncio
import copy
import random
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.tokenlimit.test_limiter_contract import SEOUL, Harness, limits
from tokenlimit.limiter import Day, Scope, ScopeReading
from tokenlimit.limiter_memory import MemoryBackend, _window_state

SHAPE = limits(
    requests_per_minute=12, tokens_per_minute=2000, tokens_per_hour=9000,
    tokens_per_day=20_000, cooldown_minutes=1, max_parallel_requests=3,
)  # fmt: skip
KEY_SHAPE = limits(tokens_per_minute=1500, max_parallel_requests=2, cooldown_minutes=1)
NEAR_MIDNIGHT = datetime(2026, 11, 24, 23, 30, 0, tzinfo=SEOUL).timestamp()


def workload(seed: int, steps: int, *, backwards: bool) -> Iterator[tuple[str, Any]]:
    """Random operations: ("admit", (rid, tokens, at, lease)), ("settle", (rid, tokens, at)),
    ("renew", (rid, at)), ("peek", at). With `backwards`, operations sometimes arrive a little
    out of time order (gateways whose clocks disagree)."""
    rng = random.Random(seed)
    now = NEAR_MIDNIGHT
    open_rids: list[str] = []
    for step in range(steps):
        now += rng.choice([0.0, 0.5, 2.0, 9.0, 31.0, 300.0])
        at = now - (rng.choice([0.0, 0.0, 0.0, 1.5]) if backwards else 0.0)
        yield "peek", now + rng.choice([0.0, 0.0, 0.7, 45.0, 900.0])
        roll = rng.random()
        if open_rids and roll < 0.35:
            yield "settle", (open_rids.pop(rng.randrange(len(open_rids))), rng.randrange(900), at)
        elif open_rids and roll < 0.45:
            yield "renew", (rng.choice(open_rids), at)
        else:
            rid = f"r{step}"
            # Refused ones too: settling those is a settlement without a reservation, as a late
            # one after its lease ran out is (what it reports is charged).
            open_rids.append(rid)
            yield "admit", (rid, rng.randrange(0, 800), at, rng.choice([20.0, 60.0]))


def reference(backend: MemoryBackend, scope: Scope, at: float) -> ScopeReading:
    """What admission's own code says at `at`, run on a copy of the state."""
    state = copy.deepcopy(backend.scopes.get(scope.key))
    shadow = MemoryBackend()
    if state is not None:
        shadow.scopes[scope.key] = state
    day = Day.at(at, SEOUL)
    prepared = shadow._state(scope, at, day)
    return ScopeReading(
        key=scope.key,
        state=_window_state(scope, prepared, at, day),
        used_requests=prepared.requests.total,
        used_tokens=prepared.minute.total,
        used_tokens_hour=prepared.hour.total,
        used_tokens_day=prepared.day_total,
        in_flight=len(prepared.leases),
        max_parallel=scope.limits.max_parallel_requests,
        cooldown_remaining=max(prepared.cooldown_until - at, 0.0),
    )


def play(harness: Harness, operation: str, values: Any) -> None:
    if operation == "admit":
        rid, tokens, at, lease = values
        harness.admit(tokens, at, rid, lease)
    elif operation == "settle":
        harness.settle(*values)
    elif operation == "renew":
        rid, at = values
        harness.renew(rid, at, lease=40.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_embedded_peek_equals_admissions_own_computation(seed: int) -> None:
    h = Harness(MemoryBackend(), SHAPE, KEY_SHAPE)
    assert isinstance(h.backend, MemoryBackend)
    for operation, values in workload(seed, 400, backwards=True):
        if operation == "peek":
            expected = [reference(h.backend, scope, values) for scope in h.scopes]
            assert h.peek(values) == expected, values
        else:
            play(h, operation, values)
    h.loop.close()


@pytest.mark.redis
def test_redis_peek_equals_the_embedded_peek(redis_url: str) -> None:
    from tokenlimit.limiter_redis import RedisBackend

    prefix = f"peek-{uuid.uuid4().hex}"
    memory = Harness(MemoryBackend(), SHAPE, KEY_SHAPE)
    on_redis = Harness(RedisBackend(redis_url, 2.0, prefix=prefix), SHAPE)
    on_redis.scopes = memory.scopes
    try:
        for operation, values in workload(5, 400, backwards=False):
            if operation != "peek":
                play(memory, operation, values)
                play(on_redis, operation, values)
                continue
            for a, b in zip(memory.peek(values), on_redis.peek(values), strict=True):
                assert (a.key, a.used_requests, a.used_tokens, a.used_tokens_hour) == (
                    b.key, b.used_requests, b.used_tokens, b.used_tokens_hour,
                )  # fmt: skip
                assert (a.used_tokens_day, a.in_flight, a.max_parallel) == (
                    b.used_tokens_day, b.in_flight, b.max_parallel,
                )  # fmt: skip
                assert a.cooldown_remaining == pytest.approx(b.cooldown_remaining, abs=1e-5)
                for name, value in vars_of(a.state).items():
                    assert value == pytest.approx(getattr(b.state, name), abs=1e-5), name
    finally:
        on_redis.loop.run_until_complete(on_redis.backend.close())
        on_redis.loop.close()
        memory.loop.close()
        forget(redis_url, prefix)


def forget(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def vars_of(state: object) -> dict[str, Any]:
    return {name: getattr(state, name) for name in state.__slots__}


@pytest.mark.redis
def test_redis_peek_writes_nothing(redis_url: str) -> None:
    import redis

    from tokenlimit.limiter_redis import RedisBackend

    prefix = f"peek-{uuid.uuid4().hex}"
    h = Harness(RedisBackend(redis_url, 2.0, prefix=prefix), SHAPE, KEY_SHAPE)
    client = redis.Redis.from_url(redis_url)

    def snapshot() -> dict[bytes, bytes | None]:
        return {key: client.dump(key) for key in client.scan_iter(f"{prefix}:*")}

    try:
        t = NEAR_MIDNIGHT
        expiring = h.admit(500, t, lease=20)
        settled = h.admit(300, t + 1)
        h.settle(settled.rid, 900, t + 2)
        h.admit(1, t + 3)
        before = snapshot()
        # Past the lease, the minute, the hour and midnight: everything admission would expire.
        for at in (t + 21, t + 61, t + 1800, t + 3700):
            h.peek(at)
        assert snapshot() == before
        assert expiring.admitted
        h.admit(0, t + 3700)  # the test can fail: admission does expire these
        assert snapshot() != before
    finally:
        client.close()
        forget(redis_url, prefix)
        h.loop.run_until_complete(h.backend.close())
        h.loop.close()


@pytest.fixture
def fast_thread_switches() -> Iterator[None]:
    # Switch threads fifty times more often than Python does by default, so that a dictionary
    # changing under a reader's iteration is met within the test's second and a half (without
    # the backend's lock: dozens of times).
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(previous)


def test_embedded_peek_from_another_thread_while_the_loop_admits(
    fast_thread_switches: None,
) -> None:
    backend = MemoryBackend()
    roomy = limits(tokens_per_minute=10**9, tokens_per_hour=10**9)
    scopes = [Scope(f"u:{n}", roomy) for n in range(4)]
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]
    start = NEAR_MIDNIGHT

    def reader() -> None:
        day = Day.at(start, SEOUL)
        while not stop.is_set():
            try:
                # Ahead of the loop's clock: every entry and lease is expired for the reader,
                # so it walks the whole logs while the loop keeps adding to them.
                backend.peek_sync(scopes, start + 100, day)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
            reads[0] += 1
            time.sleep(0.0002)  # a view reads now and then, not in a tight loop

    async def gateway_loop() -> int:
        now, step = start, 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            step += 1
            now += 0.001
            scope = [scopes[step % 4]]
            day = Day.at(now, SEOUL)
            await backend.admit(scope, f"r{step}", 3, now, 0.05, day)
            if step % 3:
                await backend.settle(scope, f"r{step}", 2, now, day)
        return step

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        steps = asyncio.run(gateway_loop())
    finally:
        stop.set()
        thread.join(10)
    assert not errors, f"{len(errors)} failed reads, first: {errors[0]!r}"
    assert reads[0] > 50 and steps > 1000  # both sides ran
