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
credit (the tag starts at V, never earlier). A plan's priority comes before any tag: a
request of a higher priority goes before every waiting request of a lower one (the order
SGLang's --enable-priority-scheduling keeps in the server's own queue).

No user holds every place: each may hold at most the pool less one place for each other user
seen in the last SEEN_SECONDS (at least one, at most `reserve`: the gateway's headroom, an
eighth of the pool, gateway/scheduling.py). A waiting request whose user is at its cap is
passed over, however low its tag, and the places go to the next requests in order; so a user
who keeps the pool full still leaves room for each other user's next request to start at once,
instead of waiting for one of the full user's long answers to end, and leaves no more room
idle than there are users to take it (bench/fairness_bench.py: a fixed eighth of 64 places
cost 5 points of the server's throughput, 93 % of FIFO's against 98 %, when 4 light users
needed 4).

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
import collections
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

LUA = (Path(__file__).with_name("fair_queue.lua")).read_text()
# A waiting entry not polled for this long belongs to a dead gateway (polls come every few ms).
WAIT_LEASE_SECONDS = 5.0
# A waiting request looks this far ahead of itself for requests that may take a place first
# (past it, it waits: bounded work a poll, whatever the queue's length).
SCAN_LIMIT = 256
# Priorities are clamped to ± this: exact as a Redis score (a double).
MAX_PRIORITY = 10**9
# A user who asked for a place this recently keeps one free for its next request.
SEEN_SECONDS = 60.0


class FairQueueUnavailable(Exception):
    """The shared queue could not be reached (Redis down): the caller's policy decides."""


@dataclass(frozen=True)
class Ticket:
    pool: str  # the upstream pool (a served model)
    rid: str
    user: str
    share: float  # cost / weight: reserved tokens over the plan's weight
    priority: int = 0  # higher first, before any tag (within MAX_PRIORITY)


@dataclass(frozen=True)
class PoolLimits:
    capacity: int  # places in the pool
    reserve: int  # places kept from one user for others, at most (0: none)
    lease: float  # seconds a place is held at most (a dead gateway's place frees then)
    max_waiting: int  # past it, enqueue refuses


@dataclass(frozen=True)
class Position:
    granted: bool
    ahead: int = 0  # waiting requests before this one
    running: int = 0  # requests holding a place
    refused: bool = False  # the queue is full
    gone: bool = False  # not in the queue any more (left, or its entry expired)
    # Its user holds its cap: it waits for one of its user's own places to free, however fast
    # the queue drains (`ahead` is then its rank, not a measure of its wait).
    capped: bool = False


class FairQueue(Protocol):
    async def enqueue(self, ticket: Ticket, limits: PoolLimits, now: float) -> Position: ...

    async def poll(self, ticket: Ticket, limits: PoolLimits, now: float) -> Position: ...

    async def leave(self, ticket: Ticket, now: float) -> None: ...

    async def close(self) -> None: ...


def _position(raw: list[Any]) -> Position:
    code, ahead, running = int(raw[0]), int(raw[1]), int(raw[2])
    return Position(
        code == 1, ahead, running, refused=code == -1, gone=code == -2, capped=code == 3
    )


@dataclass
class _Pool:
    in_flight: dict[str, tuple[float, str]] = field(default_factory=dict)  # rid -> lease, user
    held: collections.Counter[str] = field(default_factory=collections.Counter)  # user -> places
    # (-priority, tag, arrival, rid) in order: a poll's rank is one bisection, not a sort.
    order: list[tuple[int, float, int, str]] = field(default_factory=list)
    entries: dict[str, tuple[int, float, int, str, float, str]] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)  # user -> last tag
    seen: dict[str, float] = field(default_factory=dict)  # user -> when it last enqueued
    virtual_time: float = 0.0

    def user_cap(self, limits: PoolLimits, user: str, now: float) -> int:
        """The pool less a place for each other user seen lately (1 to `reserve`)."""
        if limits.reserve <= 0:
            return limits.capacity
        for who, when in list(self.seen.items()):
            if when <= now - SEEN_SECONDS:
                del self.seen[who]
        others = len(self.seen) - (user in self.seen)
        return max(limits.capacity - min(limits.reserve, max(others, 1)), 1)

    def free(self, rid: str) -> None:
        held = self.in_flight.pop(rid, None)
        if held is not None:
            self.held[held[1]] -= 1


class MemoryFairQueue:
    """The same queue in one process (no Redis): the embedded mode and the contract's twin."""

    def __init__(self) -> None:
        self.pools: dict[str, _Pool] = {}
        self._seq = itertools.count()

    def _pool(self, ticket: Ticket, now: float) -> _Pool:
        pool = self.pools.setdefault(ticket.pool, _Pool())
        for rid, (deadline, _user) in list(pool.in_flight.items()):
            if deadline <= now:
                pool.free(rid)
        return pool

    async def enqueue(self, ticket: Ticket, limits: PoolLimits, now: float) -> Position:
        pool = self._pool(ticket, now)
        pool.seen[ticket.user] = now
        if len(pool.entries) >= limits.max_waiting:
            return Position(False, len(pool.entries), len(pool.in_flight), refused=True)
        tag = max(pool.virtual_time, pool.last.get(ticket.user, 0.0)) + ticket.share
        pool.last[ticket.user] = tag
        key = (-_clamped(ticket.priority), tag, next(self._seq), ticket.rid)
        pool.entries[ticket.rid] = (*key, ticket.share, ticket.user)
        bisect.insort(pool.order, key)
        return self._turn(pool, ticket, limits, now)

    async def poll(self, ticket: Ticket, limits: PoolLimits, now: float) -> Position:
        return self._turn(self._pool(ticket, now), ticket, limits, now)

    def _turn(self, pool: _Pool, ticket: Ticket, limits: PoolLimits, now: float) -> Position:
        entry = pool.entries.get(ticket.rid)
        if entry is None:
            if ticket.rid in pool.in_flight:
                return Position(True, 0, len(pool.in_flight))
            return Position(False, 0, len(pool.in_flight), gone=True)
        negated_priority, tag, seq, rid, share, user = entry
        rank = bisect.bisect_left(pool.order, (negated_priority, tag, seq, rid))
        user_cap = pool.user_cap(limits, user, now)
        if pool.held[user] >= user_cap:
            return Position(False, rank, len(pool.in_flight), capped=True)
        ahead = rank
        if rank <= SCAN_LIMIT:
            users = [pool.entries[key[3]][5] for key in pool.order[:rank]]
            ahead = _first_served(users, pool.held, user_cap)
            if ahead < limits.capacity - len(pool.in_flight):
                self._remove(pool, ticket.rid)
                pool.in_flight[ticket.rid] = (now + limits.lease, user)
                pool.held[user] += 1
                pool.virtual_time = max(pool.virtual_time, tag - share)
                return Position(True, 0, len(pool.in_flight))
        return Position(False, ahead, len(pool.in_flight))

    @staticmethod
    def _remove(pool: _Pool, rid: str) -> None:
        entry = pool.entries.pop(rid, None)
        if entry is not None:
            del pool.order[bisect.bisect_left(pool.order, entry[:4])]

    async def leave(self, ticket: Ticket, now: float) -> None:
        pool = self._pool(ticket, now)
        pool.free(ticket.rid)
        self._remove(pool, ticket.rid)

    async def close(self) -> None:
        return None


def _clamped(priority: int) -> int:
    return min(max(priority, -MAX_PRIORITY), MAX_PRIORITY)


def _first_served(users_ahead: list[str], held: collections.Counter[str], cap: int) -> int:
    """How many of the requests ahead (their users, in order) would take a place first: those
    whose user is below the cap, counting the places each takes."""
    taking: collections.Counter[str] = collections.Counter()
    served = 0
    for user in users_ahead:
        if held[user] + taking[user] < cap:
            taking[user] += 1
            served += 1
    return served


_LEAVING = PoolLimits(0, 0, 0.0, 0)


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
        return [f"{base}:in", f"{base}:wait", f"{base}:state", f"{base}:wait-lease",
                f"{base}:seen"]  # fmt: skip

    async def _call(self, op: str, ticket: Ticket, limits: PoolLimits, now: float) -> Position:
        args: list[str | float] = [
            op, ticket.rid, ticket.user, ticket.share, limits.capacity, now, limits.lease,
            limits.max_waiting, WAIT_LEASE_SECONDS, limits.reserve, SCAN_LIMIT,
            _clamped(ticket.priority), SEEN_SECONDS,
        ]  # fmt: skip
        try:
            raw = await asyncio.wait_for(
                self.script(keys=self._keys(ticket.pool), args=args), self.timeout
            )
        except Exception as exc:  # connection refused, timeout, a Redis error: all "down"
            raise FairQueueUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
        return _position(raw)

    async def enqueue(self, ticket: Ticket, limits: PoolLimits, now: float) -> Position:
        return await self._call("enqueue", ticket, limits, now)

    async def poll(self, ticket: Ticket, limits: PoolLimits, now: float) -> Position:
        return await self._call("poll", ticket, limits, now)

    async def leave(self, ticket: Ticket, now: float) -> None:
        await self._call("leave", ticket, _LEAVING, now)

    async def close(self) -> None:
        await self.client.aclose()
