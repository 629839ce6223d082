"""The Redis limiter backend: every gateway replica shares one state, one round trip a decision.

Each call runs tokenlimit/limiter.lua (EVALSHA) over a pooled connection. Two deadlines, because
two different things go wrong: a Redis that cannot be reached (refused, reset: at once; no
route: LIMITER_REDIS_CONNECT_TIMEOUT) is reported as LimiterUnavailable fast, while a reply
that is merely slow (a burst; an event loop busy on a loaded machine, which delays every
timer) gets LIMITER_REDIS_REPLY_TIMEOUT. A single short timeout for both turned healthy bursts
into 503s. The pool is bounded and blocking: a burst beyond it waits for a free connection
within the reply deadline (redis-py's default pool raised MaxConnectionsError instead).
A connection broken by a Redis restart is replaced on its first use, so recovery needs no
restart.

`RedisReader` is the synchronous twin for peeking from Django views: redis.asyncio connections
belong to the event loop that opened them, and a view runs in a worker thread (or under the test
client, with a new loop per call), so it cannot borrow the gateway's pool. It runs the same
script's read-only `peek` op with the same keys, timeouts and retry.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.retry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

from tokenlimit.limiter import (
    Day,
    Decision,
    LimiterUnavailable,
    Scope,
    ScopeReading,
    WindowState,
    merge_states,
    remaining,
    scope_reading,
)

LUA = (Path(__file__).with_name("limiter.lua")).read_text()
KEY_NAMES = ("r", "m", "h", "a", "d", "p", "c")


def scope_keys(scope: Scope, day: Day, prefix: str = "lim") -> list[str]:
    # `u:12` or `u:12:k:5`; the user part is the hash tag so a user's keys share a slot.
    tag, _, key_part = scope.key.partition(":k:")
    base = f"{prefix}:{{{tag}}}" + (f":k:{key_part}" if key_part else "")
    return [f"{base}:d:{day.name}" if name == "d" else f"{base}:{name}" for name in KEY_NAMES]


def cluster_options(pool_size: int, connect_timeout: float, reply_timeout: float) -> dict[str, Any]:
    """A Redis Cluster client's settings: connections per node, the same two timeouts."""
    return {
        "max_connections": pool_size,
        "socket_timeout": reply_timeout,
        "socket_connect_timeout": connect_timeout,
    }


def scope_args(scope: Scope) -> list[int]:
    limits = scope.limits
    return [
        limits.requests_per_minute,
        limits.tokens_per_minute,
        limits.tokens_per_hour,
        limits.tokens_per_day,
        limits.max_parallel_requests,
        limits.cooldown_minutes * 60,
    ]


def script_call(
    scopes: list[Scope],
    op: str,
    rid: str,
    tokens: int,
    now: float,
    lease: float,
    day: Day,
    prefix: str,
    floor: int = 0,
) -> tuple[list[str], list[Any]]:
    """limiter.lua's KEYS and ARGV for one operation (`floor`: admit's, after the scopes)."""
    keys = [k for scope in scopes for k in scope_keys(scope, day, prefix)]
    args: list[Any] = [op, repr(now), rid, tokens, repr(lease), day.name, repr(day.ends_in)]
    args.append(len(scopes))
    args.extend(a for scope in scopes for a in scope_args(scope))
    args.append(floor)
    return keys, args


class RedisBackend:
    def __init__(
        self,
        url: str,
        connect_timeout: float = 0.5,
        prefix: str = "lim",
        *,
        reply_timeout: float = 2.0,
        pool_size: int = 64,
        cluster: bool = False,
    ) -> None:
        self.prefix = prefix
        # Waiting for a free connection, connecting and the reply share one deadline.
        self.deadline = connect_timeout + reply_timeout
        self.client: Any
        if cluster:
            # A Redis Cluster: `url` names any node; a call goes to the node owning its keys'
            # slot (one slot per user, scope_keys), and a moved slot is followed.
            self.client = aioredis.RedisCluster.from_url(
                url, **cluster_options(pool_size, connect_timeout, reply_timeout)
            )
            self.script = self.client.register_script(LUA)
            return
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=reply_timeout,
            socket_timeout=reply_timeout,
            socket_connect_timeout=connect_timeout,
            # A pooled connection that broke while Redis restarted fails on first use: one
            # immediate retry on a fresh connection. Timeouts are not retried (the bound).
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
        )
        self.client = aioredis.Redis(connection_pool=pool)
        self.script = self.client.register_script(LUA)

    async def _run(
        self,
        scopes: list[Scope],
        op: str,
        rid: str,
        tokens: int,
        now: float,
        lease: float,
        day: Day,
        floor: int = 0,
    ) -> Any:
        keys, args = script_call(scopes, op, rid, tokens, now, lease, day, self.prefix, floor)
        try:
            return await asyncio.wait_for(self.script(keys=keys, args=args), self.deadline)
        except (RedisError, OSError, TimeoutError) as exc:
            raise LimiterUnavailable(f"{exc.__class__.__name__}: {exc}") from exc

    async def admit(
        self,
        scopes: list[Scope],
        rid: str,
        tokens: int,
        now: float,
        lease: float,
        day: Day,
        floor: int = 0,
    ) -> Decision:
        raw = await self._run(scopes, "admit", rid, tokens, now, lease, day, floor)
        head, per_scope = raw[:6], raw[6:]
        states = [_state(scope, per_scope[i * 8 : i * 8 + 8]) for i, scope in enumerate(scopes)]
        return Decision(
            admitted=bool(int(head[0])),
            kind=_text(head[1]),
            retry_after=float(head[2]),
            limit=int(head[3]),
            used=int(head[4]),
            requested=int(head[5]),
            state=merge_states(states),
        )

    async def settle(
        self, scopes: list[Scope], rid: str, tokens: int, now: float, day: Day
    ) -> None:
        await self._run(scopes, "settle", rid, tokens, now, 0.0, day)

    async def renew(self, scopes_by_rid: dict[str, list[Scope]], now: float, lease: float) -> None:
        # One call per user (its keys share a slot); ids are joined into one argument.
        groups: dict[tuple[Scope, ...], list[str]] = {}
        for rid, scopes in scopes_by_rid.items():
            groups.setdefault(tuple(scopes), []).append(rid)
        day = Day("renew", 0.0)  # renew touches no day counter
        for group, rids in groups.items():
            await self._run(list(group), "renew", " ".join(rids), 0, now, lease, day)

    async def peek(self, scopes: list[Scope], now: float, day: Day) -> list[ScopeReading]:
        return readings(scopes, await self._run(scopes, "peek", "", 0, now, 0.0, day))

    async def close(self) -> None:
        await self.client.aclose()
        if isinstance(self.client, aioredis.Redis):
            await self.client.connection_pool.disconnect()


class RedisReader:
    """Synchronous, thread-safe peeks (module docstring); one per process is enough."""

    def __init__(
        self,
        url: str,
        connect_timeout: float,
        *,
        reply_timeout: float,
        pool_size: int,
        cluster: bool = False,
    ) -> None:
        self.client: Any
        if cluster:
            self.client = redis.RedisCluster.from_url(
                url, **cluster_options(pool_size, connect_timeout, reply_timeout)
            )
            self.script = self.client.register_script(LUA)
            return
        # Each step has its own bound here (no event loop to put one deadline around the call):
        # a free connection within the reply timeout, connecting within the connect timeout,
        # the reply within the reply timeout; a refused connection fails at once.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=reply_timeout,
            socket_timeout=reply_timeout,
            socket_connect_timeout=connect_timeout,
            retry=redis.retry.Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
        )
        self.client = redis.Redis(connection_pool=pool)
        self.script = self.client.register_script(LUA)

    def peek(self, scopes: list[Scope], now: float, day: Day, prefix: str) -> list[ScopeReading]:
        keys, args = script_call(scopes, "peek", "", 0, now, 0.0, day, prefix)
        try:
            raw = self.script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
        return readings(scopes, raw)

    def close(self) -> None:
        self.client.close()
        if isinstance(self.client, redis.Redis):
            self.client.connection_pool.disconnect()


def readings(scopes: list[Scope], raw: list[Any]) -> list[ScopeReading]:
    """The `peek` op's reply: ten values per scope."""
    out = []
    for i, scope in enumerate(scopes):
        requests, reset_r, used_m, reset_m, used_h, reset_h, used_d, reset_d, running, cooldown = (
            raw[i * 10 : i * 10 + 10]
        )
        out.append(
            scope_reading(
                scope,
                (int(requests), int(used_m), int(used_h), int(used_d)),
                (float(reset_r), float(reset_m), float(reset_h), float(reset_d)),
                int(running),
                float(cooldown),
            )
        )
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _state(scope: Scope, values: list[Any]) -> WindowState:
    limits = scope.limits
    requests, reset_r, used_m, reset_m, used_h, reset_h, used_d, reset_d = values
    return WindowState(
        limit_requests=limits.requests_per_minute,
        remaining_requests=remaining(limits.requests_per_minute, int(requests)),
        reset_requests=float(reset_r),
        limit_tokens=limits.tokens_per_minute,
        remaining_tokens=remaining(limits.tokens_per_minute, int(used_m)),
        reset_tokens=float(reset_m),
        limit_tokens_hour=limits.tokens_per_hour,
        remaining_tokens_hour=remaining(limits.tokens_per_hour, int(used_h)),
        reset_tokens_hour=float(reset_h),
        limit_tokens_day=limits.tokens_per_day,
        remaining_tokens_day=remaining(limits.tokens_per_day, int(used_d)),
        reset_tokens_day=float(reset_d),
    )
