"""A fair queue in front of an upstream that is full: who goes next when a place frees.

Limits (tokenlimit/limiter.py) say how much each user may use; they do not say who goes first
when the GPU server is saturated. An upstream pool has a capacity (the requests it runs at
once, ServedModel.max_concurrent_requests, across every gateway). Below it a request passes
straight through (one script call). At capacity it waits here, and the places that free go to
the waiting requests in the order of weighted fair queueing (start-time fair queueing, the
self-clocked variant): a request's tag is `max(V, the user's last tag) + cost / weight`, with
cost its reserved tokens and weight its plan's share; the lowest tag goes first, and the
virtual time V advances to the start tag of what is served. A user who sends 64 long requests
at once queues them one behind the other in tag order, so a light user's short request,
tagged from V, overtakes all but the first few of them. A user who was idle does not save up
credit (the tag starts at V, never earlier).

Shared by every gateway through Redis (`RedisFairQueue`, tokenlimit/fair_queue.lua: one script
call an enqueue, poll or leave, so concurrent gateways never give one place twice), or held in
the process (`MemoryFairQueue`, the embedded mode). A waiting request polls for its turn (the
gateway: every few milliseconds, and at once when a place frees in its own process).

Failure modes, and what was chosen:
- a gateway dies holding a place: the place's lease (the model's request timeout plus a margin)
  runs out and it frees; until then the pool runs one place short;
- a gateway dies with requests waiting: each waiting entry has a short lease that every poll
  renews (WAIT_LEASE_SECONDS); a dead waiter's entry expires and stops holding back the ones
  behind it;
- Redis does not answer: the gateway lets the request through unordered (fail open,
  gateway/scheduling.py): the limits still hold on their own, and a queue that refuses healthy
  traffic is worse than one that does not order it;
- a client that leaves while waiting: the gateway removes its entry at once.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

LUA = (Path(__file__).with_name("fair_queue.lua")).read_text()
# A waiting entry not polled for this long belongs to a dead gateway (polls come every few ms).
WAIT_LEASE_SECONDS = 5.0


class FairQueueUnavailable(Exception):
    """The shared queue could not be reached (Redis down): the caller's policy decides."""


@dataclass(frozen=True)
class Ticket:
    pool: str  # the upstream pool (a served model)
    rid: str
    user: str
    share: float  # cost / weight: reserved tokens over the plan's weight


@dataclass(frozen=True)
class Position:
    granted: bool
    ahead: int = 0  # waiting requests before this one
    running: int = 0  # requests holding a place
    refused: bool = False  # the queue is full
    gone: bool = False  # not in the queue any more (left, or its entry expired)


class FairQueue(Protocol):
    async def enqueue(
        self, ticket: Ticket, capacity: int, now: float, lease: float, max_waiting: int
    ) -> Position: ...

    async def poll(self, ticket: Ticket, capacity: int, now: float, lease: float) -> Position: ...

    async def leave(self, ticket: Ticket, now: float) -> None: ...

    async def close(self) -> None: ...


def _position(raw: list[Any]) -> Position:
    code, ahead, running = int(raw[0]), int(raw[1]), int(raw[2])
    return Position(code == 1, ahead, running, refused=code == -1, gone=code == -2)


@dataclass
class _Pool:
    in_flight: dict[str, float] = field(default_factory=dict)  # rid -> lease deadline
    # (tag, arrival, rid) in order: a poll's rank is one bisection, not a sort.
    order: list[tuple[float, int, str]] = field(default_factory=list)
    entries: dict[str, tuple[float, int, str, float]] = field(default_factory=dict)  # +share
    last: dict[str, float] = field(default_factory=dict)  # user -> last tag
    virtual_time: float = 0.0


class MemoryFairQueue:
    """The same queue in one process (no Redis): the embedded mode and the contract's twin."""

    def __init__(self) -> None:
        self.pools: dict[str, _Pool] = {}
        self._seq = itertools.count()

    def _pool(self, ticket: Ticket, now: float) -> _Pool:
        pool = self.pools.setdefault(ticket.pool, _Pool())
        for rid, deadline in list(pool.in_flight.items()):
            if deadline <= now:
                del pool.in_flight[rid]
        return pool

    async def enqueue(
        self, ticket: Ticket, capacity: int, now: float, lease: float, max_waiting: int
    ) -> Position:
        pool = self._pool(ticket, now)
        if len(pool.entries) >= max_waiting:
            return Position(False, len(pool.entries), len(pool.in_flight), refused=True)
        tag = max(pool.virtual_time, pool.last.get(ticket.user, 0.0)) + ticket.share
        pool.last[ticket.user] = tag
        key = (tag, next(self._seq), ticket.rid)
        pool.entries[ticket.rid] = (*key, ticket.share)
        bisect.insort(pool.order, key)
        return self._turn(pool, ticket, capacity, now, lease)

    async def poll(self, ticket: Ticket, capacity: int, now: float, lease: float) -> Position:
        return self._turn(self._pool(ticket, now), ticket, capacity, now, lease)

    def _turn(
        self, pool: _Pool, ticket: Ticket, capacity: int, now: float, lease: float
    ) -> Position:
        entry = pool.entries.get(ticket.rid)
        if entry is None:
            if ticket.rid in pool.in_flight:
                return Position(True, 0, len(pool.in_flight))
            return Position(False, 0, len(pool.in_flight), gone=True)
        tag, seq, rid, share = entry
        ahead = bisect.bisect_left(pool.order, (tag, seq, rid))
        if ahead < capacity - len(pool.in_flight):
            self._remove(pool, ticket.rid)
            pool.in_flight[ticket.rid] = now + lease
            pool.virtual_time = max(pool.virtual_time, tag - share)
            return Position(True, 0, len(pool.in_flight))
        return Position(False, ahead, len(pool.in_flight))

    @staticmethod
    def _remove(pool: _Pool, rid: str) -> None:
        entry = pool.entries.pop(rid, None)
        if entry is not None:
            del pool.order[bisect.bisect_left(pool.order, entry[:3])]

    async def leave(self, ticket: Ticket, now: float) -> None:
        pool = self._pool(ticket, now)
        pool.in_flight.pop(ticket.rid, None)
        self._remove(pool, ticket.rid)

    async def close(self) -> None:
        return None


class RedisFairQueue:
    """The queue every gateway shares, in Redis: one script call an operation."""

    def __init__(self, url: str, prefix: str, *, timeout: float = 2.0, pool_size: int = 32) -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        self.timeout = timeout
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            max_connections=pool_size,
        )  # fmt: skip
        self.script = self.client.register_script(LUA)

    def _keys(self, pool: str) -> list[str]:
        # The pool is the hash tag: one pool's keys in one slot (a cluster-safe layout).
        base = f"{self.prefix}:fq:{{{pool}}}"
        return [f"{base}:in", f"{base}:wait", f"{base}:state", f"{base}:wait-lease"]

    async def _call(
        self, op: str, ticket: Ticket, capacity: int, now: float, lease: float = 0.0,
        max_waiting: int = 0,
    ) -> Position:  # fmt: skip
        args: list[str | float] = [
            op, ticket.rid, ticket.user, ticket.share, capacity, now, lease, max_waiting,
            WAIT_LEASE_SECONDS,
        ]  # fmt: skip
        try:
            raw = await asyncio.wait_for(
                self.script(keys=self._keys(ticket.pool), args=args), self.timeout
            )
        except Exception as exc:  # connection refused, timeout, a Redis error: all "down"
            raise FairQueueUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
        return _position(raw)

    async def enqueue(
        self, ticket: Ticket, capacity: int, now: float, lease: float, max_waiting: int
    ) -> Position:
        return await self._call("enqueue", ticket, capacity, now, lease, max_waiting)

    async def poll(self, ticket: Ticket, capacity: int, now: float, lease: float) -> Position:
        return await self._call("poll", ticket, capacity, now, lease)

    async def leave(self, ticket: Ticket, now: float) -> None:
        await self._call("leave", ticket, 0, now)

    async def close(self) -> None:
        await self.client.aclose()
