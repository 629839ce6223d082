"""The scheduler in one process (gateway/scheduling.py, on the in-process queue unless said):
Redis down lets requests through, the server's priority order, headroom, a capped user not
judged by the queue's pace, and the 503 past the queue cap with its Retry-After."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.caches import ModelInfo
from gateway.errors import GatewayError
from gateway.scheduling import Scheduler, pool_limits, queue_priority
from quotas.request_policy import RequestAccess
from quotas.services import KeyGrant
from tests.procs import free_port
from tokenlimit.fair_queue import MemoryFairQueue, RedisFairQueue
from tokenlimit.limiter import Limits

MODEL = "Qwen/Qwen2.5-7B-Instruct"


def model(places: int) -> ModelInfo:
    return ModelInfo(MODEL, (), "http://up", "", 32768, None, 300.0,
                     max_concurrent_requests=places)  # fmt: skip


def grant(user_id: int) -> KeyGrant:
    limits = Limits(0, 0, 0, 0, 0, 0)
    return KeyGrant(user_id, user_id, "u", limits, None, None, False, RequestAccess())


async def stays() -> dict[str, Any]:
    """A client's receive() that never says it left."""
    await asyncio.sleep(3600)
    return {}


def test_without_redis_the_queue_lets_requests_through() -> None:
    queue = RedisFairQueue(f"redis://127.0.0.1:{free_port()}/0", "down", timeout=0.3)
    scheduler = Scheduler(queue)

    async def acquire() -> Any:
        try:
            return await scheduler.acquire(model(1), grant(1), "rid", 10, stays)
        finally:
            await scheduler.close()

    started = time.monotonic()
    place = asyncio.run(acquire())
    assert place.ticket is None  # let through, nothing held
    assert time.monotonic() - started < 5


def test_the_queue_follows_the_servers_priority_order(settings: Any) -> None:
    assert (queue_priority(5), queue_priority(None)) == (5, 0)
    settings.GATEWAY_QUEUE_LOW_PRIORITY_VALUES_FIRST = True
    assert (queue_priority(5), queue_priority(-2)) == (-5, 2)


@pytest.mark.parametrize(
    ("capacity", "headroom", "reserve"),
    [(64, 0.125, 8), (64, 0.0625, 4), (8, 0.125, 1), (2, 0.9, 1), (1, 0.5, 0), (64, 0, 0)],
)
def test_headroom_keeps_places_for_others(
    settings: Any, capacity: int, headroom: float, reserve: int
) -> None:
    settings.GATEWAY_QUEUE_HEADROOM = headroom
    limits = pool_limits(capacity, 300.0)
    assert (limits.capacity, limits.reserve, limits.lease) == (capacity, reserve, 360.0)


def test_a_capped_request_is_not_judged_by_the_queues_pace(settings: Any) -> None:
    """A user at its cap waits for its own places: a slow drain rate seen earlier must not
    refuse it at once, and its place comes when its own first one frees."""
    settings.GATEWAY_QUEUE_HEADROOM = 0.5  # 2 places, 1 a user
    scheduler = Scheduler(MemoryFairQueue())

    async def run() -> None:
        first = await scheduler.acquire(model(2), grant(1), "first", 10, stays)
        # A pace that would make any queued request wait for 1,000 s, past its 30 s bound.
        scheduler.drain_rates[MODEL] = (0.001, time.monotonic())
        second = asyncio.ensure_future(scheduler.acquire(model(2), grant(1), "second", 10, stays))
        await asyncio.sleep(0.1)
        assert not second.done()  # waiting, not refused
        await first.release()
        place = await asyncio.wait_for(second, 5)
        assert place.ticket is not None and place.ticket.rid == "second"
        await place.release()

    asyncio.run(run())


@pytest.mark.parametrize(("rate", "retry_after"), [(None, "1"), (2.0, "1"), (0.5, "4")])
def test_past_the_queue_cap_503_with_a_retry_after_from_the_drain_rate(
    settings: Any, rate: float | None, retry_after: str
) -> None:
    """One place, one waiting at most: the next request is refused at once with 503, told to
    come back when, at the measured rate, the one waiting and itself would be served."""
    settings.GATEWAY_QUEUE_MAX_WAITING = 1
    scheduler = Scheduler(MemoryFairQueue())

    async def run() -> GatewayError:
        holder = await scheduler.acquire(model(1), grant(1), "held", 10, stays)
        waiting = asyncio.ensure_future(scheduler.acquire(model(1), grant(2), "waiting", 10, stays))
        await asyncio.sleep(0.05)
        if rate is not None:
            scheduler.drain_rates[MODEL] = (rate, time.monotonic())
        try:
            await scheduler.acquire(model(1), grant(3), "refused", 10, stays)
        except GatewayError as exc:
            refused = exc
        else:
            raise AssertionError("not refused")
        assert not waiting.done()
        await holder.release()
        await (await asyncio.wait_for(waiting, 5)).release()
        return refused

    refused = asyncio.run(run())
    assert (refused.status, refused.type) == (503, "overloaded")
    assert dict(refused.headers)[b"retry-after"] == retry_after.encode()
