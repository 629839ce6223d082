"""One contract, two backends: the embedded limiter and the Redis one answer alike.

Time comes from the test (an injected `now`), so window edges, rollovers and midnight in Seoul
are exact and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tokenlimit.limiter import (
    COOLDOWN,
    PARALLEL,
    REQUESTS,
    TOKENS,
    TOKENS_DAY,
    TOKENS_HOUR,
    TOO_LARGE,
    Day,
    Decision,
    Limits,
    Scope,
    ScopeReading,
    WindowState,
    format_duration,
    merge_states,
)
from tokenlimit.limiter_memory import MemoryBackend

SEOUL = ZoneInfo("Asia/Seoul")
T0 = datetime(2026, 11, 24, 12, 0, 0, tzinfo=SEOUL).timestamp()
LEASE = 60.0


def limits(**overrides: int) -> Limits:
    values = {
        "requests_per_minute": 0,
        "tokens_per_minute": 0,
        "tokens_per_hour": 0,
        "tokens_per_day": 0,
        "cooldown_minutes": 0,
        "max_parallel_requests": 0,
    }
    values.update(overrides)
    return Limits(**values)


class Outcome:
    """A decision plus the reservation id it was made for."""

    def __init__(self, decision: Decision, rid: str) -> None:
        self.decision = decision
        self.rid = rid

    def __getattr__(self, name: str) -> object:
        return getattr(self.decision, name)


class Harness:
    def __init__(self, backend: object, limits_: Limits, key_limits: Limits | None = None) -> None:
        self.backend = backend
        user = f"u:{uuid.uuid4().hex[:12]}"
        self.scopes = [Scope(user, limits_)]
        if key_limits is not None:
            self.scopes.append(Scope(f"{user}:k:1", key_limits))
        self.loop = asyncio.new_event_loop()

    def admit(
        self, tokens: int, at: float, rid: str | None = None, lease: float = LEASE
    ) -> Outcome:
        rid = rid or uuid.uuid4().hex
        decision = self.loop.run_until_complete(
            self.backend.admit(self.scopes, rid, tokens, at, lease, Day.at(at, SEOUL))
        )
        return Outcome(decision, rid)

    def settle(self, rid: str, tokens: int, at: float) -> None:
        self.loop.run_until_complete(
            self.backend.settle(self.scopes, rid, tokens, at, Day.at(at, SEOUL))
        )

    def renew(self, rid: str, at: float, lease: float = LEASE) -> None:
        self.loop.run_until_complete(self.backend.renew({rid: self.scopes}, at, lease))

    def peek(self, at: float) -> list[ScopeReading]:
        return self.loop.run_until_complete(self.backend.peek(self.scopes, at, Day.at(at, SEOUL)))

    def looked_at(self, at: float) -> WindowState:
        """What admission reports at `at` for a request it refuses without starting a cooldown
        (too large for a window: nothing but the expiry of old state happens)."""
        refused = self.admit(2**40, at).decision
        assert refused.kind in (TOO_LARGE, COOLDOWN), refused.kind
        return refused.state


def merged(readings: list[ScopeReading]) -> WindowState:
    # merge_states changes its first argument: never a reading's own state.
    return merge_states([dataclasses.replace(reading.state) for reading in readings])


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),  # three nodes (tests/procs.py)
    ]
)
def make(request: pytest.FixtureRequest) -> Iterator[object]:
    made: list[Harness] = []
    backend_factory: Any
    if request.param == "memory":
        backend_factory = MemoryBackend
    else:
        from django.conf import settings

        from tokenlimit.limiter_redis import RedisBackend

        cluster = request.param == "redis-cluster"
        url = request.getfixturevalue("redis_cluster_url") if cluster else settings.REDIS_URL

        def backend_factory() -> RedisBackend:
            return RedisBackend(url, 2.0, cluster=cluster)

    def factory(limits_: Limits, key_limits: Limits | None = None) -> Harness:
        harness = Harness(backend_factory(), limits_, key_limits)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        close = getattr(harness.backend, "close", None)
        if close is not None:
            harness.loop.run_until_complete(close())
        harness.loop.close()


def test_requests_per_minute_edge_is_exact(make) -> None:
    h = make(limits(requests_per_minute=3))
    for i in range(3):
        assert h.admit(1, T0 + i).admitted
    refused = h.admit(1, T0 + 10)
    assert (refused.admitted, refused.kind) == (False, REQUESTS)
    assert refused.retry_after == pytest.approx(50.0)
    assert (refused.limit, refused.used, refused.requested) == (3, 3, 1)
    assert not h.admit(1, T0 + 59.999).admitted
    assert h.admit(1, T0 + 60).admitted  # the first request has left the window
    assert not h.admit(1, T0 + 60.5).admitted


def test_tokens_per_minute_rolls_and_says_when(make) -> None:
    h = make(limits(tokens_per_minute=1000))
    assert h.admit(600, T0).admitted
    assert h.admit(300, T0 + 20).admitted
    refused = h.admit(500, T0 + 30)
    assert refused.kind == TOKENS and (refused.limit, refused.used, refused.requested) == (
        1000,
        900,
        500,
    )
    assert refused.retry_after == pytest.approx(30.0)  # when the 600 leave
    assert h.admit(500, T0 + 60).admitted
    assert refused.state.remaining_tokens == 100


def test_refund_returns_unused_reservation(make) -> None:
    h = make(limits(tokens_per_minute=1000))
    first = h.admit(900, T0)
    assert not h.admit(200, T0 + 1).admitted
    h.settle(first.rid, 100, T0 + 2)
    second = h.admit(900, T0 + 3)
    assert second.admitted and second.state.remaining_tokens == 0


def test_overrun_is_charged_and_never_lost_at_the_window_edge(make) -> None:
    h = make(limits(tokens_per_minute=1000, tokens_per_day=10_000))
    first = h.admit(100, T0)
    h.settle(first.rid, 103, T0 + 1)  # the llama.cpp server overran max_tokens
    assert h.admit(897, T0 + 2, lease=1000).state.remaining_tokens == 0
    late = h.admit(50, T0 + 61, lease=1000)
    h.settle(late.rid, 80, T0 + 125)  # settled after its entry left the minute window
    assert h.admit(0, T0 + 126).state.remaining_tokens == 1000 - 30
    assert h.admit(0, T0 + 126).state.remaining_tokens_day == 10_000 - (103 + 897 + 80)


def test_counters_never_go_negative(make) -> None:
    h = make(limits(tokens_per_minute=1000, tokens_per_day=5000))
    first = h.admit(100, T0)
    h.settle(first.rid, 0, T0 + 1)
    h.settle(first.rid, 0, T0 + 2)  # settling twice refunds nothing more
    h.settle("never-admitted", 0, T0 + 3)
    state = h.admit(10, T0 + 4).state
    assert state.remaining_tokens == 990 and state.remaining_tokens_day == 4990


def test_tokens_per_hour(make) -> None:
    h = make(limits(tokens_per_hour=1000))
    first = h.admit(700, T0)
    h.settle(first.rid, 700, T0 + 1)
    second = h.admit(300, T0 + 600)
    h.settle(second.rid, 300, T0 + 601)
    refused = h.admit(1, T0 + 1200)
    assert refused.kind == TOKENS_HOUR and refused.retry_after == pytest.approx(2400.0)
    assert h.admit(700, T0 + 3600).admitted


def test_daily_quota_resets_at_midnight_in_seoul(make) -> None:
    h = make(limits(tokens_per_day=1000))
    before_midnight = datetime(2026, 11, 24, 23, 59, 0, tzinfo=SEOUL).timestamp()
    assert h.admit(900, before_midnight).admitted
    refused = h.admit(200, before_midnight + 30)
    assert refused.kind == TOKENS_DAY
    assert refused.retry_after == pytest.approx(30.0)
    assert refused.state.remaining_tokens_day == 100
    assert h.admit(200, before_midnight + 60).admitted  # 00:00:00 KST, a new day
    assert h.admit(0, before_midnight + 61).state.remaining_tokens_day == 800


def test_request_larger_than_a_whole_window_is_refused_without_cooldown(make) -> None:
    h = make(limits(tokens_per_minute=1000, cooldown_minutes=5))
    refused = h.admit(1001, T0)
    assert refused.kind == TOO_LARGE and refused.limit == 1000
    assert h.admit(1000, T0 + 1).admitted  # no cooldown started


def test_cooldown_starts_on_refusal_and_ends_by_itself(make) -> None:
    h = make(limits(requests_per_minute=1, cooldown_minutes=2))
    assert h.admit(1, T0).admitted
    refused = h.admit(1, T0 + 10)
    assert refused.kind == REQUESTS and refused.retry_after == pytest.approx(120.0)
    during = h.admit(1, T0 + 100)  # the minute window is free again, the cooldown is not over
    assert during.kind == COOLDOWN and during.retry_after == pytest.approx(30.0)
    still = h.admit(1, T0 + 129.9)  # refusals during a cooldown do not extend it
    assert still.kind == COOLDOWN and still.retry_after == pytest.approx(0.1, abs=1e-3)
    assert h.admit(1, T0 + 130).admitted


def test_parallel_cap_and_release_on_settle(make) -> None:
    h = make(limits(max_parallel_requests=2))
    a, b = h.admit(1, T0), h.admit(1, T0)
    assert a.admitted and b.admitted
    assert h.admit(1, T0).kind == PARALLEL
    h.settle(a.rid, 1, T0 + 1)
    assert h.admit(1, T0 + 1).admitted


def test_lease_expiry_releases_slot_and_tokens_of_a_dead_gateway(make) -> None:
    h = make(limits(max_parallel_requests=1, tokens_per_minute=1000))
    lost = h.admit(900, T0, lease=30)
    assert h.admit(10, T0 + 29).kind == PARALLEL
    h.renew(lost.rid, T0 + 20, lease=30)  # a live gateway renews...
    assert h.admit(10, T0 + 45).kind == PARALLEL
    after = h.admit(1000, T0 + 51)  # ...a dead one does not: released at T0 + 50
    assert after.admitted
    h.settle(lost.rid, 5, T0 + 52)  # a late settlement still charges what was used
    assert h.admit(0, T0 + 53).state.remaining_tokens == 0


def test_key_limits_are_tighter_than_the_users(make) -> None:
    h = make(limits(tokens_per_minute=10_000), limits(tokens_per_minute=100))
    assert h.admit(100, T0).admitted
    refused = h.admit(1, T0 + 1)
    assert refused.kind == TOKENS and refused.limit == 100
    assert refused.state.limit_tokens == 100 and refused.state.remaining_tokens == 0


def test_refusal_changes_nothing(make) -> None:
    h = make(limits(tokens_per_minute=1000, requests_per_minute=10))
    assert h.admit(800, T0).admitted
    assert not h.admit(300, T0 + 1).admitted
    state = h.admit(200, T0 + 2).state
    assert state.remaining_tokens == 0 and state.remaining_requests == 8


def test_headers_state_reports_resets(make) -> None:
    h = make(limits(requests_per_minute=10, tokens_per_minute=1000, tokens_per_day=5000))
    h.admit(100, T0)
    state = h.admit(100, T0 + 6).state
    assert state.remaining_requests == 8 and state.reset_requests == pytest.approx(60.0)
    assert state.remaining_tokens == 800 and state.reset_tokens == pytest.approx(60.0)
    assert state.remaining_tokens_day == 4800
    assert state.reset_tokens_day == pytest.approx(Day.at(T0 + 6, SEOUL).ends_in)


def test_peek_of_an_empty_scope(make) -> None:
    shape = limits(
        requests_per_minute=10, tokens_per_minute=1000, tokens_per_hour=5000,
        tokens_per_day=20_000, cooldown_minutes=1, max_parallel_requests=3,
    )  # fmt: skip
    h = make(shape)
    assert h.peek(T0) == [
        ScopeReading(
            key=h.scopes[0].key,
            state=WindowState(10, 10, 0.0, 1000, 1000, 0.0, 5000, 5000, 0.0, 20_000, 20_000, 0.0),
            used_requests=0,
            used_tokens=0,
            used_tokens_hour=0,
            used_tokens_day=0,
            in_flight=0,
            max_parallel=3,
            cooldown_remaining=0.0,
        )
    ]
    assert h.looked_at(T0) == h.peek(T0)[0].state


def test_peek_after_admissions_shows_what_the_last_decision_said(make) -> None:
    h = make(limits(requests_per_minute=10, tokens_per_minute=1000, tokens_per_day=5000))
    h.admit(100, T0)
    last = h.admit(200, T0 + 6)
    [reading] = h.peek(T0 + 6)
    assert reading.state == last.state  # remaining and resets, to the last digit
    assert (reading.used_requests, reading.used_tokens, reading.used_tokens_day) == (2, 300, 300)
    assert (reading.used_tokens_hour, reading.in_flight) == (0, 2)  # no hourly limit, no log
    later = h.peek(T0 + 30)
    assert later[0].state.reset_requests == pytest.approx(36.0)
    assert later[0].state == h.looked_at(T0 + 30)
    [edge] = h.peek(T0 + 60)  # the first entry leaves at exactly 60 s, as in admission
    assert (edge.used_requests, edge.used_tokens) == (1, 200)
    assert edge.state == h.looked_at(T0 + 60)
    assert h.peek(T0 + 66)[0].used_tokens == 0  # both entries have left the minute window


def test_peek_after_a_refund(make) -> None:
    h = make(limits(tokens_per_minute=1000, tokens_per_day=10_000))
    first = h.admit(900, T0)
    h.settle(first.rid, 100, T0 + 2)
    [reading] = h.peek(T0 + 3)
    assert (reading.used_tokens, reading.state.remaining_tokens) == (100, 900)
    assert (reading.used_tokens_day, reading.in_flight) == (100, 0)
    assert reading.state.reset_tokens == pytest.approx(57.0)  # the refunded entry stays
    assert reading.state == h.looked_at(T0 + 3)
    assert h.admit(900, T0 + 3).state.remaining_tokens == 0


def test_peek_hour_and_day_windows_across_midnight_in_seoul(make) -> None:
    h = make(limits(tokens_per_hour=1000, tokens_per_day=2000))
    midnight = datetime(2026, 11, 25, 0, 0, 0, tzinfo=SEOUL).timestamp()
    first = h.admit(700, midnight - 1800)
    h.settle(first.rid, 700, midnight - 1790)
    second = h.admit(200, midnight - 60)
    h.settle(second.rid, 200, midnight - 50)
    [before] = h.peek(midnight - 30)
    assert (before.used_tokens_hour, before.state.remaining_tokens_hour) == (900, 100)
    assert before.state.reset_tokens_hour == pytest.approx(3570.0)  # the newest entry leaves
    assert (before.used_tokens_day, before.state.remaining_tokens_day) == (900, 1100)
    assert before.state.reset_tokens_day == pytest.approx(30.0)
    assert before.state == h.looked_at(midnight - 30)
    [after] = h.peek(midnight)  # 00:00:00 KST: a new day, the same rolling hour
    assert (after.used_tokens_day, after.state.remaining_tokens_day) == (0, 2000)
    assert after.state.reset_tokens_day == 0.0
    assert after.used_tokens_hour == 900
    assert after.state == h.looked_at(midnight)
    assert h.peek(midnight + 1800)[0].used_tokens_hour == 200  # the 700 left the hour
    h.admit(300, midnight + 1801)
    [today] = h.peek(midnight + 1802)
    assert today.used_tokens_day == 300
    assert today.state.reset_tokens_day == pytest.approx(Day.at(midnight + 1802, SEOUL).ends_in)


def test_peek_shows_the_cooldown_left(make) -> None:
    h = make(limits(requests_per_minute=1, cooldown_minutes=2, tokens_per_minute=10_000))
    assert h.admit(1, T0).admitted
    assert h.admit(1, T0 + 10).kind == REQUESTS  # starts the cooldown, until T0 + 130
    [reading] = h.peek(T0 + 40)
    assert reading.cooldown_remaining == pytest.approx(90.0)
    assert (reading.used_requests, reading.state.remaining_requests) == (1, 0)
    assert h.peek(T0 + 100)[0].cooldown_remaining == pytest.approx(30.0)
    assert h.peek(T0 + 100)[0].used_requests == 0
    during = h.admit(1, T0 + 100)  # peeking neither ended nor extended it
    assert during.kind == COOLDOWN and during.retry_after == pytest.approx(30.0)
    assert h.peek(T0 + 130)[0].cooldown_remaining == 0.0
    assert h.admit(1, T0 + 130).admitted


def test_peek_counts_requests_in_flight_and_honours_lease_expiry(make) -> None:
    h = make(limits(max_parallel_requests=2, tokens_per_minute=1000, tokens_per_day=5000))
    lost = h.admit(300, T0, lease=30)
    kept = h.admit(200, T0, lease=100)
    [reading] = h.peek(T0 + 10)
    assert (reading.in_flight, reading.max_parallel, reading.used_tokens) == (2, 2, 500)
    [expired] = h.peek(T0 + 30)  # `lost`'s gateway died: its slot and tokens are free
    assert (expired.in_flight, expired.used_tokens, expired.used_tokens_day) == (1, 200, 200)
    assert expired.state == h.looked_at(T0 + 30)
    h.settle(kept.rid, 150, T0 + 31)
    [settled] = h.peek(T0 + 31)
    assert (settled.in_flight, settled.used_tokens, settled.used_tokens_day) == (0, 150, 150)
    h.settle(lost.rid, 5, T0 + 32)  # a late settlement still charges what was used
    assert h.peek(T0 + 32)[0].used_tokens == 155


def test_peek_does_not_release_a_lease_that_is_renewed_late(make) -> None:
    h = make(limits(max_parallel_requests=1))
    slow = h.admit(10, T0, lease=30)
    assert h.peek(T0 + 31)[0].in_flight == 0  # counted as expired, as admission would...
    h.renew(slow.rid, T0 + 31, lease=30)  # ...but only admission releases it
    assert h.peek(T0 + 32)[0].in_flight == 1
    assert h.admit(10, T0 + 32).kind == PARALLEL


def test_peek_reads_the_user_and_the_key_scope(make) -> None:
    h = make(
        limits(tokens_per_minute=10_000, requests_per_minute=100),
        limits(tokens_per_minute=100, max_parallel_requests=4),
    )
    last = h.admit(60, T0)
    user, key = h.peek(T0)
    assert (user.key, key.key) == (h.scopes[0].key, h.scopes[1].key)
    assert (user.used_tokens, user.state.remaining_tokens, user.state.remaining_requests) == (
        60,
        9940,
        99,
    )
    assert (key.used_tokens, key.state.remaining_tokens, key.used_requests) == (60, 40, 0)
    assert (user.max_parallel, key.max_parallel, key.in_flight) == (0, 4, 1)
    assert merged([user, key]) == last.state


def test_peek_never_changes_a_later_decision(make) -> None:
    """One random workload twice, peeking in between (also at times ahead of the next
    operation, as a reader with a faster clock would) in one run only: identical decisions."""
    shape = limits(
        requests_per_minute=12, tokens_per_minute=2000, tokens_per_hour=9000,
        tokens_per_day=20_000, cooldown_minutes=1, max_parallel_requests=3,
    )  # fmt: skip
    key_shape = limits(tokens_per_minute=1500, max_parallel_requests=2, cooldown_minutes=1)
    peeked, plain = make(shape, key_shape), make(shape, key_shape)
    rng = random.Random(11)
    now = datetime(2026, 11, 24, 23, 40, 0, tzinfo=SEOUL).timestamp()  # crosses midnight
    open_rids: list[str] = []
    for step in range(300):
        now += rng.choice([0.0, 0.5, 2.0, 9.0, 31.0])
        peeked.peek(now + rng.choice([0.0, 0.0, 1.0, 45.0]))
        roll = rng.random()
        if open_rids and roll < 0.35:
            rid = open_rids.pop(rng.randrange(len(open_rids)))
            used = rng.randrange(0, 900)
            for h in (peeked, plain):
                h.settle(rid, used, now)
        elif open_rids and roll < 0.45:
            rid = rng.choice(open_rids)
            for h in (peeked, plain):
                h.renew(rid, now, lease=40)
        else:
            rid, tokens, lease = f"r{step}", rng.randrange(0, 800), rng.choice([20.0, 60.0])
            a, b = peeked.admit(tokens, now, rid, lease), plain.admit(tokens, now, rid, lease)
            assert dataclasses.astuple(a.decision) == dataclasses.astuple(b.decision), step
            if a.admitted:
                open_rids.append(rid)
    last_a, last_b = peeked.peek(now), plain.peek(now)
    assert [dataclasses.replace(r, key="") for r in last_a] == [
        dataclasses.replace(r, key="") for r in last_b
    ]


def test_backends_agree_on_a_random_workload() -> None:
    """Same random admissions and settlements on both backends → the same decisions."""
    pytest.importorskip("redis")
    from django.conf import settings

    if not settings.REDIS_URL:
        from tests.conftest import _missing

        _missing("needs REDIS_URL=redis://…")
    import random

    from tokenlimit.limiter_redis import RedisBackend

    rng = random.Random(7)
    shape = limits(
        requests_per_minute=30, tokens_per_minute=3000, tokens_per_hour=20_000,
        tokens_per_day=50_000, cooldown_minutes=1, max_parallel_requests=4,
    )  # fmt: skip
    memory = Harness(MemoryBackend(), shape)
    redis_h = Harness(RedisBackend(settings.REDIS_URL, 2.0), shape)
    redis_h.scopes = [Scope(memory.scopes[0].key, shape)]
    open_rids: list[str] = []
    now = T0
    for _ in range(400):
        now += rng.choice([0.0, 0.5, 1.0, 3.0, 7.0])
        if open_rids and rng.random() < 0.5:
            rid = open_rids.pop(rng.randrange(len(open_rids)))
            used = rng.randrange(0, 400)
            memory.settle(rid, used, now)
            redis_h.settle(rid, used, now)
            continue
        rid, tokens = uuid.uuid4().hex, rng.randrange(1, 600)
        a, b = memory.admit(tokens, now, rid), redis_h.admit(tokens, now, rid)
        assert (a.admitted, a.kind, a.limit, a.used) == (b.admitted, b.kind, b.limit, b.used)
        assert a.retry_after == pytest.approx(b.retry_after, abs=1e-3)
        assert a.state.remaining_tokens == b.state.remaining_tokens
        if a.admitted:
            open_rids.append(rid)
    redis_h.loop.run_until_complete(redis_h.backend.close())


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (1, "1s"),
        (9.66, "10s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3725, "1h2m5s"),
    ],
)
def test_reset_durations_look_like_openais(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
