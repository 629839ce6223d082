"""The gateway's use of the limiter: admission before the call, settlement after, leases kept
alive while a request runs, the Redis-down policy, and the 429 a client sees; and the live
state of a user's windows for pages (`read_live_state`), read without admitting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from django.conf import settings

from gateway import metrics
from gateway.errors import GatewayError
from gateway.ledger import Interrupted
from quotas.services import KeyGrant
from tokenlimit.limiter import (
    COOLDOWN,
    LIMIT_FIELDS,
    PARALLEL,
    REQUESTS,
    TOKENS,
    TOKENS_DAY,
    TOKENS_HOUR,
    TOO_LARGE,
    Backend,
    Clock,
    Day,
    Decision,
    LimiterUnavailable,
    Limits,
    Scope,
    ScopeReading,
    ratelimit_headers,
    system_clock,
)
from tokenlimit.limiter_memory import MemoryBackend

if TYPE_CHECKING:
    from tokenlimit.limiter_redis import RedisReader

log = logging.getLogger(__name__)
MAX_RESERVATION = 2**48

WINDOW_NAMES = {
    REQUESTS: "requests per min (RPM)",
    TOKENS: "tokens per min (TPM)",
    TOKENS_HOUR: "tokens per hour (TPH)",
    TOKENS_DAY: "tokens per day (TPD)",
    PARALLEL: "parallel requests",
}


def limiter_redis_url() -> str:
    """Where the limiter's state lives: LIMITER_REDIS_URL, else REDIS_URL, else in memory ("")."""
    return str(settings.LIMITER_REDIS_URL or settings.REDIS_URL)


def make_backend() -> Backend:
    if limiter_redis_url():
        from tokenlimit.limiter_redis import RedisBackend

        return RedisBackend(
            limiter_redis_url(),
            settings.LIMITER_REDIS_CONNECT_TIMEOUT,
            settings.LIMITER_REDIS_PREFIX,
            reply_timeout=settings.LIMITER_REDIS_REPLY_TIMEOUT,
            pool_size=settings.LIMITER_REDIS_POOL_SIZE,
            cluster=settings.LIMITER_REDIS_CLUSTER,
        )
    return MemoryBackend()


_embedded: MemoryBackend | None = None
_readers: dict[tuple[str, float, float, int, bool], RedisReader] = {}
_shared_lock = threading.Lock()


def shared_backend() -> Backend:
    """The backend a gateway of this process uses.

    Embedded (no REDIS_URL) the limiter state lives in memory, so every gateway of the process
    and `read_live_state` must use one MemoryBackend, made once. With Redis the state is shared
    through Redis and each gateway gets its own RedisBackend: its asyncio pool belongs to the
    gateway's event loop and is closed with it.
    """
    if limiter_redis_url():
        return make_backend()
    return _embedded_backend()


def _embedded_backend() -> MemoryBackend:
    global _embedded
    with _shared_lock:
        if _embedded is None:
            _embedded = MemoryBackend()
        return _embedded


def _redis_reader() -> RedisReader:
    """The process's synchronous Redis client, one per connection setting (tests change them;
    the key prefix is passed with each read)."""
    from tokenlimit.limiter_redis import RedisReader

    setting = (
        limiter_redis_url(),
        settings.LIMITER_REDIS_CONNECT_TIMEOUT,
        settings.LIMITER_REDIS_REPLY_TIMEOUT,
        settings.LIMITER_REDIS_POOL_SIZE,
        settings.LIMITER_REDIS_CLUSTER,
    )
    with _shared_lock:
        reader = _readers.get(setting)
        if reader is None:
            reader = _readers[setting] = RedisReader(
                setting[0], setting[1], reply_timeout=setting[2], pool_size=setting[3],
                cluster=setting[4],
            )  # fmt: skip
        return reader


def read_live_state(scopes: list[Scope], *, now: float | None = None) -> list[ScopeReading]:
    """Each scope's windows as the x-ratelimit-* headers would show them now, admitting nothing.

    Synchronous, for Django views: safe from any thread, with or without an event loop. Reads
    the gateway's own MemoryBackend when embedded, Redis otherwise; raises LimiterUnavailable
    when Redis cannot be reached in time. `now` is for tests with an injected clock.
    """
    at = system_clock() if now is None else now
    day = Day.at(at, ZoneInfo(settings.LIMITER_TIME_ZONE))
    if limiter_redis_url():
        return _redis_reader().peek(scopes, at, day, settings.LIMITER_REDIS_PREFIX)
    return _embedded_backend().peek_sync(scopes, at, day)


def user_scope(user_id: int, limits: Limits) -> Scope:
    return Scope(f"u:{user_id}", limits)


def key_scope(user_id: int, key_id: int, limits: Limits) -> Scope:
    # Under the user's part, so limiter_redis keeps a user's keys in one hash slot.
    return Scope(f"u:{user_id}:k:{key_id}", limits)


def user_scopes(
    user_id: int, limits: Limits, key_scopes: Iterable[tuple[int, Limits]] = ()
) -> list[Scope]:
    """The scopes admission counts for a user: the user's, then one per key with limits of its
    own, `(key id, key limits)` (a key without its own limits has no counters but the user's).
    """
    return [
        user_scope(user_id, limits),
        *(key_scope(user_id, key_id, key_limits) for key_id, key_limits in key_scopes),
    ]


class GatewayLimiter:
    def __init__(self, backend: Backend, clock: Clock = system_clock) -> None:
        self.backend = backend
        self.clock = clock
        self.zone = ZoneInfo(settings.LIMITER_TIME_ZONE)
        self.lease = settings.LIMITER_LEASE_SECONDS
        self.fail_open = settings.LIMITER_ON_REDIS_FAILURE == "open"
        self.active: dict[str, list[Scope]] = {}
        self._renewer: asyncio.Task[None] | None = None

    def scopes(self, grant: KeyGrant) -> list[Scope]:
        scopes = [user_scope(grant.user_id, grant.limits)]
        if grant.key_limits is not None:
            scopes.append(key_scope(grant.user_id, grant.key_id, grant.key_limits))
        return scopes

    async def admit(
        self, grant: KeyGrant, rid: str, tokens: int, model: str, floor: int = 0
    ) -> Decision | None:
        """The decision (None when Redis is down and the policy is `open`); raises a 429/503.
        `floor` > 0: reserve what the windows allow between it and `tokens` (Backend.admit)."""
        scopes = self.scopes(grant)
        now = self.clock()
        # Lua numbers are doubles and HINCRBY takes 64-bit integers: no reservation may near
        # either edge (requests are bounded far below this; this only guards the invariant).
        tokens = min(max(tokens, 0), MAX_RESERVATION)
        floor = min(max(floor, 0), tokens)
        try:
            with metrics.LIMITER_SECONDS.time():
                decision = await self.backend.admit(
                    scopes, rid, tokens, now, self.lease, Day.at(now, self.zone), floor
                )
        except LimiterUnavailable as exc:
            if self.fail_open:
                log.error("limiter unavailable, admitting (LIMITER_ON_REDIS_FAILURE=open): %s", exc)
                return None
            log.error("limiter unavailable, refusing: %s", exc)
            raise GatewayError(
                503,
                "Rate limits cannot be checked right now; please retry shortly.",
                type_="service_unavailable",
                code="limiter_unavailable",
                headers=[(b"retry-after", b"1")],
            ) from None
        if not decision.admitted:
            raise refusal(decision, model)
        self.active[rid] = scopes
        self._ensure_renewer()
        return decision

    def held_scopes(self, rid: str) -> list[list[Any]]:
        """The scopes holding `rid`'s reservation, as the write-ahead log keeps them."""
        return [[scope.key, *_limit_values(scope.limits)] for scope in self.active.get(rid, ())]

    async def release_interrupted(self, closed: list[Interrupted]) -> None:
        """Settle requests of a dead gateway (closed by spool adoption) at what they were charged:
        their parallel slots and the unused part of their reservations come back now, not when
        their leases run out."""
        now = self.clock()
        day = Day.at(now, self.zone)
        for request in closed:
            scopes = [Scope(key, Limits(*values)) for key, *values in request.scopes]
            if not scopes:
                continue  # admitted without a reservation (Redis was down, policy `open`)
            try:
                await self.backend.settle(scopes, request.request_id, request.charged, now, day)
            except (LimiterUnavailable, TypeError, ValueError) as exc:
                log.error("could not release interrupted %s: %s", request.request_id, exc)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        await self.backend.close()

    async def settle(self, grant: KeyGrant, rid: str, tokens: int) -> None:
        scopes = self.active.pop(rid, None) or self.scopes(grant)
        now = self.clock()
        try:
            await self.backend.settle(scopes, rid, tokens, now, Day.at(now, self.zone))
        except LimiterUnavailable:
            # The lease will run out and release the reservation; the ledger still has the row.
            log.error("could not settle %s (%d tokens): limiter unavailable", rid, tokens)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew_forever())

    async def _renew_forever(self) -> None:
        # Leases outlive a request only while this process is alive to renew them.
        while self.active:
            await asyncio.sleep(self.lease / 3)
            with contextlib.suppress(LimiterUnavailable):
                await self.backend.renew(dict(self.active), self.clock(), self.lease)


def _limit_values(limits: Limits) -> list[int]:
    return [getattr(limits, name) for name in LIMIT_FIELDS]


def refusal(decision: Decision, model: str) -> GatewayError:
    retry = max(decision.retry_after, 0.0)
    seconds = f"{retry:.2f}".rstrip("0").rstrip(".") + "s"
    should_retry = b"true"
    code = "rate_limit_exceeded"
    kind = decision.kind
    if kind == TOO_LARGE:
        message = (
            f"Request too large for {model}: Limit {decision.limit}, Requested "
            f"{decision.requested}. The input or output tokens must be reduced in order to run "
            "successfully."
        )
        should_retry = b"false"
        kind = TOKENS
    elif kind == COOLDOWN:
        message = (
            f"Rate limit cooldown in effect for {model}: a limit was exceeded recently. "
            f"Please try again in {seconds}."
        )
    elif kind == TOKENS_DAY:
        message = (
            f"You exceeded your daily token quota for {model}: Limit {decision.limit}, Used "
            f"{decision.used}, Requested {decision.requested}. The quota resets at midnight "
            f"({settings.LIMITER_TIME_ZONE}), in {seconds}."
        )
        should_retry = b"false"
        code = "insufficient_quota"
    else:
        message = (
            f"Rate limit reached for {model} on {WINDOW_NAMES[kind]}: Limit {decision.limit}, "
            f"Used {decision.used}, Requested {decision.requested}. "
            f"Please try again in {seconds}."
        )
    headers = [
        (b"retry-after", str(math.ceil(retry)).encode()),
        (b"retry-after-ms", str(math.ceil(retry * 1000)).encode()),
        (b"x-should-retry", should_retry),
        *ratelimit_headers(decision.state),
    ]
    return GatewayError(429, message, type_=kind, code=code, headers=headers)
