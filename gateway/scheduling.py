"""Who goes next when a model's server is full: the gateway's side of the fair queue.

A model with `max_concurrent_requests` (ServedModel, "places upstream") set gets a pool of that
many places, counted across every gateway (tokenlimit/fair_queue.py: in Redis when REDIS_URL is
set, else in this process). A request admitted by the limits takes a place and gives it back
when its answer ends; when none is free it waits, in weighted fair order (its reserved tokens
over its plan's `fair_share_weight`; a plan's `priority` first, as SGLang orders its own queue),
at most its plan's `max_queue_seconds`:

- still waiting then: 429 with a Retry-After from the rate at which the queue ahead of it
  drained while it waited (`x-should-retry: true`);
- a queue that at this rate would make it wait longer than that: 429 at once, same header;
- more than GATEWAY_QUEUE_MAX_WAITING waiting: 503 (overload), before the server's own queue;
- the client leaves while waiting: the entry is removed at once (and the limiter's reservation
  returned by the caller);
- Redis does not answer: the request goes through unordered (fail open; logged once a minute).

One user holds at most the pool less a place for each other user seen in the last minute (at
least one, at most GATEWAY_QUEUE_HEADROOM of the pool, an eighth by default): a user who keeps
the server full still leaves a place for each other user's next request to start at once.
A request with a place then waits for its turn to be prefilled (gateway/prefill_gate.py): a
burst of one user's long prompts does not hold up others' first tokens, and a user's only
request is prefilled before busy users' new ones.

Models without places (0, the default) pay nothing: no queue call at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

from django.conf import settings

from gateway import metrics
from gateway.asgi_io import ClientDisconnected, Receive, wait_for_disconnect
from gateway.caches import ModelInfo
from gateway.errors import GatewayError
from gateway.prefill_gate import Pass, PrefillGate, non_streamed_prefill_seconds
from quotas.services import KeyGrant
from tokenlimit.fair_queue import (
    FairQueue,
    FairQueueUnavailable,
    PoolLimits,
    Position,
    Ticket,
)

log = logging.getLogger(__name__)

# A place is held at most the model's request timeout plus this (a dead gateway's place frees).
LEASE_MARGIN_SECONDS = 60.0
UNAVAILABLE_LOG_EVERY = 60.0
RATE_MEMORY_SECONDS = 60.0


@dataclass(frozen=True)
class Shape:
    """What the prefill gate needs to know of a request."""

    streamed: bool = True
    prompt_tokens: int = 0


@dataclass
class Place:
    """A place in a model's pool, held until `release()`; `ticket` None: nothing was held."""

    scheduler: Scheduler | None = None
    ticket: Ticket | None = None
    admitted: Pass | None = None  # through the prefill gate (gateway/prefill_gate.py)

    def prefilled(self) -> None:
        """Its first token came (or should have): the user's next request may prefill."""
        if self.admitted is not None:
            self.admitted.prefilled()

    async def release(self) -> None:
        if self.admitted is not None:
            self.admitted.ended()
        if self.scheduler is None or self.ticket is None:
            return
        with contextlib.suppress(FairQueueUnavailable):  # if so, the lease frees it
            await self.scheduler.queue.leave(self.ticket, time.time())
        self.scheduler.wake(self.ticket.pool)
        self.ticket = None


class Scheduler:
    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        # pool -> (requests served a second, when seen): the last wait's measure, trusted for
        # RATE_MEMORY_SECONDS (a rate from a quiet hour must not refuse a busy minute).
        self.drain_rates: dict[str, tuple[float, float]] = {}
        self._last_warning = 0.0
        # pool -> resolved when a place of it frees in this process: its waiters ask at once
        # rather than at their next poll (a place handed on without an idle gap).
        self._freed: dict[str, asyncio.Future[None]] = {}
        self.gate = PrefillGate()

    def wake(self, pool: str) -> None:
        freed = self._freed.pop(pool, None)
        if freed is not None and not freed.done():
            freed.set_result(None)

    def _place_freed(self, pool: str) -> asyncio.Future[None]:
        freed = self._freed.get(pool)
        if freed is None or freed.done() or freed.get_loop() is not asyncio.get_running_loop():
            freed = self._freed[pool] = asyncio.get_running_loop().create_future()
        return freed

    async def acquire(
        self, model: ModelInfo, grant: KeyGrant, rid: str, reserved: int, receive: Receive,
        request: Shape = Shape(),
    ) -> Place:  # fmt: skip
        """A place on the model's server, and then its turn to be prefilled."""
        place = await self._place(model, grant, rid, reserved, receive)
        if place.ticket is None:
            return place
        key = (model.name, place.ticket.user)
        try:
            place.admitted = await self.gate.enter(
                key, settings.GATEWAY_QUEUE_PREFILLS_PER_USER,
                settings.GATEWAY_QUEUE_FIRST_REQUEST_HOLD_SECONDS, receive,
            )  # fmt: skip
        except BaseException:
            await place.release()
            raise
        if not request.streamed:  # no first token to see: the time its prompt takes
            delay = non_streamed_prefill_seconds(request.prompt_tokens)
            asyncio.get_running_loop().call_later(delay, place.prefilled)
        return place

    async def _place(
        self, model: ModelInfo, grant: KeyGrant, rid: str, reserved: int, receive: Receive
    ) -> Place:
        capacity = model.max_concurrent_requests
        if capacity <= 0:
            return Place()
        access = grant.access
        ticket = Ticket(model.name, rid, str(grant.user_id),
                        max(reserved, 1) / max(access.fair_share_weight, 1),
                        queue_priority(access.priority))  # fmt: skip
        limits = pool_limits(capacity, model.request_timeout)
        started = time.monotonic()
        try:
            position = await self.queue.enqueue(ticket, limits, time.time())
            if position.refused:
                raise overloaded(model.name, self._retry_after(model.name, position.ahead, 1.0))
            if not position.granted:
                await self._refuse_if_hopeless(ticket, position, access.max_queue_seconds)
                await self._wait(ticket, limits, access.max_queue_seconds, receive)
        except FairQueueUnavailable as exc:
            self._warn(exc)
            return Place()
        metrics.QUEUE_SECONDS.observe(time.monotonic() - started)
        return Place(self, ticket)

    def _rate(self, pool: str) -> float | None:
        seen = self.drain_rates.get(pool)
        if seen is None or time.monotonic() - seen[1] > RATE_MEMORY_SECONDS:
            return None
        return seen[0]

    async def _refuse_if_hopeless(self, ticket: Ticket, position: Position, bound: float) -> None:
        """At the last seen drain rate, would it wait past its plan's bound? Then say so now.
        (Not for a user at its cap: it waits for its own places, not for the queue.)"""
        rate = None if position.capped else self._rate(ticket.pool)
        expected = (position.ahead + 1) / rate if rate else 0.0
        if bound <= 0 or (rate and expected > bound):
            await self.queue.leave(ticket, time.time())
            raise queue_full(ticket.pool, self._retry_after(ticket.pool, position.ahead, bound))

    async def _wait(
        self, ticket: Ticket, limits: PoolLimits, bound: float, receive: Receive
    ) -> None:
        deadline = time.monotonic() + bound
        # The queue's pace, measured while this request stood in it uncapped: how many went
        # first since `measured_from`.
        first_ahead: int | None = None
        measured_from = 0.0
        ahead = 0
        disconnect = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    await self.queue.leave(ticket, time.time())
                    retry = self._retry_after(ticket.pool, ahead, bound)
                    raise queue_full(ticket.pool, retry)
                poll_every = settings.GATEWAY_QUEUE_POLL_SECONDS
                freed = self._place_freed(ticket.pool)
                await asyncio.wait({disconnect, freed}, timeout=min(poll_every, left))
                if disconnect.done():
                    await self.queue.leave(ticket, time.time())
                    raise ClientDisconnected()
                position = await self.queue.poll(ticket, limits, time.time())
                if position.gone:  # this loop stalled past the waiting lease: in again
                    position = await self.queue.enqueue(ticket, limits, time.time())
                if position.granted:
                    if first_ahead is not None:
                        self._note_rate(ticket.pool, first_ahead + 1, measured_from)
                    return
                if position.capped:  # its wait says nothing of the queue's pace
                    first_ahead = None
                    continue
                ahead = position.ahead
                if first_ahead is None:
                    first_ahead, measured_from = ahead, time.monotonic()
                self._note_rate(ticket.pool, first_ahead - ahead, measured_from)
        finally:
            disconnect.cancel()

    def _note_rate(self, pool: str, drained: int, since: float) -> None:
        elapsed = time.monotonic() - since
        if drained > 0 and elapsed > 0.05:
            self.drain_rates[pool] = (drained / elapsed, time.monotonic())

    def _retry_after(self, pool: str, ahead: int, fallback: float) -> float:
        rate = self._rate(pool)
        return (ahead + 1) / rate if rate else max(fallback, 1.0)

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= UNAVAILABLE_LOG_EVERY:
            self._last_warning = now
            log.error("fair queue unavailable, letting requests through unordered: %s", exc)

    async def close(self) -> None:
        await self.queue.close()


def queue_priority(priority: int | None) -> int:
    """A plan's priority as the queue orders it (higher first): SGLang's default order, or the
    reverse for servers started with --schedule-low-priority-values-first."""
    if priority is None:
        return 0
    return -priority if settings.GATEWAY_QUEUE_LOW_PRIORITY_VALUES_FIRST else priority


def pool_limits(capacity: int, request_timeout: float) -> PoolLimits:
    """A pool of `capacity` places; one user may hold all but a place for each other user
    seen lately, at most the headroom (none in a pool of one: there, a user simply waits its
    turn)."""
    headroom = math.ceil(capacity * settings.GATEWAY_QUEUE_HEADROOM) if capacity > 1 else 0
    return PoolLimits(
        capacity=capacity,
        reserve=min(headroom, capacity - 1),
        lease=request_timeout + LEASE_MARGIN_SECONDS,
        max_waiting=settings.GATEWAY_QUEUE_MAX_WAITING,
    )


def _retry_headers(seconds: float) -> list[tuple[bytes, bytes]]:
    return [
        (b"retry-after", str(max(1, math.ceil(seconds))).encode()),
        (b"retry-after-ms", str(math.ceil(seconds * 1000)).encode()),
        (b"x-should-retry", b"true"),
    ]


def queue_full(model: str, retry: float) -> GatewayError:
    return GatewayError(
        429,
        f"{model} is at capacity and your plan's wait for a place is over; please try again "
        f"in {math.ceil(retry)}s.",
        type_="queue",
        code="queue_timeout",
        headers=_retry_headers(retry),
    )


def overloaded(model: str, retry: float) -> GatewayError:
    return GatewayError(
        503,
        f"{model} is overloaded: its queue is full. Please try again in {math.ceil(retry)}s.",
        type_="overloaded",
        code="queue_full",
        headers=_retry_headers(retry),
    )


def make_queue() -> FairQueue:
    """Shared through Redis with every gateway, or this process's own."""
    from tokenlimit.fair_queue import MemoryFairQueue, RedisFairQueue

    if settings.REDIS_URL:
        return RedisFairQueue(settings.REDIS_URL, settings.LIMITER_REDIS_PREFIX)
    return MemoryFairQueue()
