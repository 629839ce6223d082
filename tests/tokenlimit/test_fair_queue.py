"""The fair queue's contract, the same for the in-process queue and the one every gateway
shares in Redis: places up to the capacity, then weighted fair order, leaving, leases of dead
gateways, the queue cap. Time is injected."""

from __future__ import annotations

import asyncio
import collections
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.procs import busy_cores
from tokenlimit import fair_queue
from tokenlimit.fair_queue import (
    WAIT_LEASE_SECONDS,
    FairQueueUnavailable,
    MemoryFairQueue,
    PoolLimits,
    RedisFairQueue,
    Ticket,
)

NOW = 1_000_000.0
LEASE = 60.0


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def queue(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryFairQueue()
        return
    from django.conf import settings

    yield RedisFairQueue(settings.REDIS_URL, f"fq-test-{uuid.uuid4().hex[:8]}")


class Pool:
    """One pool of `capacity` places, driven step by step on one event loop."""

    def __init__(self, queue: Any, capacity: int, reserve: int = 0) -> None:
        self.queue, self.capacity, self.reserve = queue, capacity, reserve
        self.name = f"pool-{uuid.uuid4().hex[:6]}"
        # One loop for the pool's life: a Redis client's connections belong to the loop that
        # opened them.
        self.loop = asyncio.new_event_loop()

    def ticket(self, user: str, cost: float, weight: float = 1.0, priority: int = 0) -> Ticket:
        return Ticket(self.name, uuid.uuid4().hex, user, cost / weight, priority)

    def limits(self, max_waiting: int = 100) -> PoolLimits:
        return PoolLimits(self.capacity, self.reserve, LEASE, max_waiting)

    def enqueue(self, ticket: Ticket, now: float = NOW, max_waiting: int = 100) -> Any:
        return self.loop.run_until_complete(
            self.queue.enqueue(ticket, self.limits(max_waiting), now)
        )

    def poll(self, ticket: Ticket, now: float = NOW) -> Any:
        return self.loop.run_until_complete(self.queue.poll(ticket, self.limits(), now))

    def leave(self, ticket: Ticket, now: float = NOW) -> None:
        self.loop.run_until_complete(self.queue.leave(ticket, now))

    def next_granted(self, waiting: list[Ticket], now: float = NOW) -> Ticket:
        """Poll every waiter (as their gateways do); exactly one gets the freed place."""
        granted = [t for t in waiting if self.poll(t, now).granted]
        assert len(granted) == 1, granted
        waiting.remove(granted[0])
        return granted[0]


def test_below_capacity_passes_at_capacity_waits(queue: Any) -> None:
    pool = Pool(queue, 2)
    first, second, third = (pool.ticket("a", 10) for _ in range(3))
    assert pool.enqueue(first).granted and pool.enqueue(second).granted
    waiting = pool.enqueue(third)
    assert not waiting.granted and waiting.ahead == 0 and waiting.running == 2
    assert not pool.poll(third).granted
    pool.leave(first)
    assert pool.poll(third).granted
    assert pool.poll(third).granted  # asking again is harmless


def test_a_light_request_overtakes_a_heavy_users_backlog(queue: Any) -> None:
    pool = Pool(queue, 1)
    holder = pool.ticket("heavy", 1000)
    assert pool.enqueue(holder).granted
    heavy = [pool.ticket("heavy", 1000) for _ in range(5)]
    for ticket in heavy:
        assert not pool.enqueue(ticket).granted
    light = pool.ticket("light", 50)
    position = pool.enqueue(light)
    assert position.ahead == 0  # tagged from the virtual time, not behind the backlog
    waiting = [*heavy, light]
    order = []
    pool.leave(holder)
    for _ in range(6):
        granted = pool.next_granted(waiting)
        order.append(granted)
        pool.leave(granted)
    assert order == [light, *heavy]


def test_places_follow_the_plans_weights(queue: Any) -> None:
    pool = Pool(queue, 1)
    holder = pool.ticket("x", 1)
    pool.enqueue(holder)
    small = [pool.ticket("small", 100, weight=1) for _ in range(6)]
    large = [pool.ticket("large", 100, weight=3) for _ in range(6)]
    for pair in zip(small, large, strict=True):
        for ticket in pair:
            pool.enqueue(ticket)
    pool.leave(holder)
    waiting = [*small, *large]
    served = []
    for _ in range(8):
        granted = pool.next_granted(waiting)
        served.append(granted.user)
        pool.leave(granted)
    # Weight 3 gets three places for each one of weight 1.
    assert served.count("large") == 6 and served.count("small") == 2, served


def test_leaving_a_place_or_the_queue(queue: Any) -> None:
    pool = Pool(queue, 1)
    holder, quitter, patient = (pool.ticket(u, 10) for u in ("a", "b", "c"))
    pool.enqueue(holder)
    pool.enqueue(quitter)
    assert pool.enqueue(patient).ahead == 1
    pool.leave(quitter)  # the client went away while waiting
    assert pool.poll(quitter).gone
    assert pool.poll(patient).ahead == 0
    pool.leave(holder)
    assert pool.poll(patient).granted


def test_a_dead_gateways_place_frees_when_its_lease_runs_out(queue: Any) -> None:
    pool = Pool(queue, 1)
    dead, alive = pool.ticket("a", 10), pool.ticket("b", 10)
    pool.enqueue(dead)
    assert not pool.enqueue(alive).granted
    at = NOW
    while at < NOW + LEASE - 1:  # the live waiter polls (more often than its own lease)
        at += WAIT_LEASE_SECONDS / 2
        assert not pool.poll(alive, min(at, NOW + LEASE - 1)).granted
    assert pool.poll(alive, NOW + LEASE + 1).granted


def test_the_queue_has_a_cap(queue: Any) -> None:
    pool = Pool(queue, 1)
    pool.enqueue(pool.ticket("a", 1))
    assert not pool.enqueue(pool.ticket("a", 1), max_waiting=1).refused
    refused = pool.enqueue(pool.ticket("b", 1), max_waiting=1)
    assert refused.refused and not refused.granted


@pytest.mark.redis
def test_a_dead_waiter_stops_holding_back_the_queue(settings: Any) -> None:
    queue = RedisFairQueue(settings.REDIS_URL, f"fq-test-{uuid.uuid4().hex[:8]}")
    pool = Pool(queue, 1)
    holder, dead, alive = (pool.ticket(u, 10) for u in ("a", "b", "c"))
    pool.enqueue(holder)
    pool.enqueue(dead)  # its gateway dies: nobody polls it again
    pool.enqueue(alive)
    pool.leave(holder)
    assert pool.poll(alive, NOW + 1).ahead == 1
    assert pool.poll(alive, NOW + WAIT_LEASE_SECONDS - 1).ahead == 1  # alive renews its lease
    assert pool.poll(alive, NOW + WAIT_LEASE_SECONDS + 0.5).granted  # the dead one's ran out
    pool.loop.run_until_complete(queue.close())


def test_a_higher_priority_goes_before_any_tag(queue: Any) -> None:
    """Priority first (higher first, clamped), then tags: an expensive urgent request overtakes
    cheap ones of a lower priority; equal priorities keep the fair order."""
    pool = Pool(queue, 1)
    holder = pool.ticket("x", 1)
    assert pool.enqueue(holder).granted
    cheap = [pool.ticket(f"c{n}", 1) for n in range(3)]
    for ticket in cheap:
        pool.enqueue(ticket)
    urgent = pool.ticket("u", 10_000, priority=5)
    assert pool.enqueue(urgent).ahead == 0
    urgent_too = pool.ticket("v", 10, priority=10**12)  # clamped, still the highest
    assert pool.enqueue(urgent_too).ahead == 0
    low = pool.ticket("l", 1, priority=-3)
    assert pool.enqueue(low).ahead == 5
    order = []
    waiting = [*cheap, urgent, urgent_too, low]
    pool.leave(holder)
    while waiting:
        order.append(pool.next_granted(waiting))
        pool.leave(order[-1])
    assert order == [urgent_too, urgent, *cheap, low]


def test_no_user_takes_more_than_its_cap(queue: Any) -> None:
    """4 places, 3 a user: the full user's next request waits though a place is free, and
    another user's request takes that place at once."""
    pool = Pool(queue, 4, reserve=1)
    for _ in range(3):
        assert pool.enqueue(pool.ticket("heavy", 1000)).granted
    more = pool.ticket("heavy", 1000)
    assert pool.enqueue(more).capped
    assert pool.poll(more).capped
    light = pool.ticket("light", 10)
    assert pool.enqueue(light).granted
    pool.leave(light)
    assert not pool.poll(more).granted  # a free place, but heavy still holds its 3


def test_a_capped_user_at_the_head_holds_nobody_back(queue: Any) -> None:
    """The capped user's waiters have the lowest tags; the place goes past them to the next
    user in order, and back to them when their user holds fewer."""
    pool = Pool(queue, 3, reserve=1)
    first, second = pool.ticket("heavy", 1), pool.ticket("heavy", 1)
    assert pool.enqueue(first).granted and pool.enqueue(second).granted
    heavy_waiting = [pool.ticket("heavy", 1) for _ in range(3)]
    for ticket in heavy_waiting:
        assert not pool.enqueue(ticket).granted
    light, other = pool.ticket("light", 500), pool.ticket("other", 500)
    light_position = pool.enqueue(light)
    assert light_position.granted  # 3 ahead, all capped: the free place is light's
    position = pool.enqueue(other)
    # The pool is full; of the 3 ahead none goes first while heavy holds its cap.
    assert not position.granted and not position.capped and position.ahead == 0
    pool.leave(first)  # heavy holds 1: its first waiter is next, before "other"
    assert pool.next_granted([*heavy_waiting, other]) is heavy_waiting[0]
    pool.leave(light)
    assert pool.next_granted([*heavy_waiting[1:], other]) is other


def test_a_place_is_kept_for_each_other_user_seen_lately(
    queue: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 places, at most 4 kept from one user: alone, the heavy user may hold 7 (one kept for
    whoever comes); with two others seen, 6; with five, 4 (the most kept); as the others
    stop asking, its cap grows back."""
    monkeypatch.setattr(fair_queue, "SEEN_SECONDS", 10.0)
    pool = Pool(queue, 8, reserve=4)
    heavy = [pool.ticket("heavy", 1) for _ in range(8)]
    assert [pool.enqueue(t).granted for t in heavy] == [True] * 7 + [False]
    assert pool.poll(heavy[7]).capped
    light, other = pool.ticket("light", 1), pool.ticket("other", 1)
    assert pool.enqueue(light, NOW + 1).granted  # the place kept free
    position = pool.enqueue(other, NOW + 2)
    assert not position.granted and not position.capped  # the pool is full
    pool.leave(heavy[0], NOW + 3)
    assert pool.poll(heavy[7], NOW + 3).capped  # heavy holds 6, its cap with two others seen
    assert pool.poll(other, NOW + 3).granted
    for name in ("c", "d", "e"):  # seen at NOW + 4, then gone (their clients left)
        ticket = pool.ticket(name, 1)
        assert not pool.enqueue(ticket, NOW + 4).granted
        pool.leave(ticket, NOW + 4)
    for ticket in (heavy[1], heavy[2], light, other):
        pool.leave(ticket, NOW + 5)
    assert pool.poll(heavy[7], NOW + 5).capped  # holds 4: five others seen, 4 kept at most
    assert pool.poll(heavy[7], NOW + 9).capped
    # Light and other last asked at NOW + 1 and + 2: three others seen now, cap 5.
    assert pool.poll(heavy[7], NOW + 12).granted
    more = pool.ticket("heavy", 1)
    assert pool.enqueue(more, NOW + 12).capped
    assert pool.poll(more, NOW + 15).granted  # nobody else seen: cap 7


def test_a_lapsed_place_counts_no_more_for_its_user(queue: Any) -> None:
    """A place whose lease ran out (its gateway died) no longer counts against its user."""
    pool = Pool(queue, 2, reserve=1)
    assert pool.enqueue(pool.ticket("a", 1)).granted
    waiting = pool.ticket("a", 1)
    assert not pool.enqueue(waiting, NOW + LEASE - 2).granted
    assert not pool.poll(waiting, NOW + LEASE - 1).granted
    assert pool.poll(waiting, NOW + LEASE + 1).granted


def test_redis_down_is_reported_as_unavailable() -> None:
    from tests.procs import free_port

    queue = RedisFairQueue(f"redis://127.0.0.1:{free_port()}/0", "fq-down", timeout=0.5)
    pool = Pool(queue, 1)
    with pytest.raises(FairQueueUnavailable):
        pool.enqueue(pool.ticket("a", 1))
    pool.loop.run_until_complete(queue.close())


@pytest.mark.redis
def test_two_gateways_never_give_more_places_than_the_capacity(settings: Any) -> None:
    """Two gateways (each its own loop and connections), 40 requests (28 of one user), 3
    places, 2 a user: never more than 3 held at once nor 2 by one user, every request served,
    both bounds reached, on a loaded machine."""
    prefix = f"fq-test-{uuid.uuid4().hex[:8]}"
    pool_name = f"pool-{uuid.uuid4().hex[:6]}"
    limits = PoolLimits(capacity=3, reserve=1, lease=LEASE, max_waiting=1000)
    held, peak, served = [0], [0], [0]
    by_user: collections.Counter[str] = collections.Counter()
    user_peak: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def gateway(users: list[str]) -> None:
        async def run() -> None:
            queue = RedisFairQueue(settings.REDIS_URL, prefix, timeout=5.0)

            async def one(user: str) -> None:
                ticket = Ticket(pool_name, uuid.uuid4().hex, user, 10.0)
                loop = asyncio.get_running_loop()
                position = await queue.enqueue(ticket, limits, loop.time())
                while not position.granted:
                    await asyncio.sleep(0.005)
                    position = await queue.poll(ticket, limits, loop.time())
                with lock:
                    held[0] += 1
                    peak[0] = max(peak[0], held[0])
                    by_user[user] += 1
                    user_peak[user] = max(user_peak[user], by_user[user])
                await asyncio.sleep(0.01)
                with lock:
                    held[0] -= 1
                    by_user[user] -= 1
                    served[0] += 1
                await queue.leave(ticket, loop.time())

            try:
                await asyncio.gather(*(one(u) for u in users))
            finally:
                await queue.close()

        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)

    with busy_cores():
        threads = [
            threading.Thread(target=gateway, args=(["u0"] * 14 + ["u1", "u2"] * 3,))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    assert served[0] == 40
    assert peak[0] == 3
    assert user_peak["u0"] == 2
