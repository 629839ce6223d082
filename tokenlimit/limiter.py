"""Multi-window admission and settlement: the types, the policy and what clients are told.

Semantics (the same in both backends, proven by one contract test suite):
- Windows per scope (a user; optionally also one key with tighter limits): requests per minute
  and tokens per minute over a rolling 60 s, tokens per hour over a rolling 3,600 s (exact
  sliding logs, not buckets), tokens per day per calendar day in LIMITER_TIME_ZONE
  (Asia/Seoul), and requests in flight. A limit of 0 means "no limit".
- Admission reserves prompt + max_tokens against every window of every scope at once, all or
  nothing. Settlement replaces the reservation with what the upstream billed: a refund goes
  back to the window the reservation was charged to, an overrun is charged (at once, to the
  current windows if the original entry has already left them), a failure before any output
  releases it. Every reservation holds a lease that the gateway renews while the request
  runs; if the gateway dies, the lease runs out and the slot and tokens are released.
- Cooldown starts when a request is refused by the requests, tokens (minute or hour) or
  parallel limit: for `cooldown_minutes` from that refusal every request of that scope is
  refused. Refusals during a cooldown do not extend it; it ends at its end time, by itself.
  A request too large for a whole window and an exhausted daily quota do not start one: the
  first is the client's mistake, the second already lasts until midnight.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

# The limits of a plan, a user (plan + overrides) or a key, in this order everywhere: the
# Plan/UserQuota/ApiKey fields, the Redis script's arguments and the write-ahead log's scopes.
LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_hour",
    "tokens_per_day",
    "cooldown_minutes",
    "max_parallel_requests",
)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one user (or key) may do; the gateway caches this next to each key. 0 = no limit."""

    requests_per_minute: int
    tokens_per_minute: int
    tokens_per_hour: int
    tokens_per_day: int
    cooldown_minutes: int
    max_parallel_requests: int
    # Empty means every served model.
    allowed_models: tuple[str, ...] = ()


MINUTE = 60.0
HOUR = 3600.0

# Refusal kinds, also the `type` of OpenAI's 429 body.
REQUESTS = "requests"
TOKENS = "tokens"
TOKENS_HOUR = "tokens_per_hour"
TOKENS_DAY = "tokens_per_day"
PARALLEL = "parallel_requests"
COOLDOWN = "cooldown"
TOO_LARGE = "request_too_large"
STARTS_COOLDOWN = frozenset({REQUESTS, TOKENS, TOKENS_HOUR, PARALLEL})

Clock = Callable[[], float]


class LimiterUnavailable(Exception):
    """The shared limiter state cannot be reached in time (Redis down)."""


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of counters: `u:<user id>` or `u:<user id>:k:<key id>` (same Redis hash slot)."""

    key: str
    limits: Limits


@dataclass(slots=True)
class WindowState:
    """A scope's windows after a decision, for the x-ratelimit-* headers."""

    limit_requests: int = 0
    remaining_requests: int = 0
    reset_requests: float = 0.0
    limit_tokens: int = 0
    remaining_tokens: int = 0
    reset_tokens: float = 0.0
    limit_tokens_hour: int = 0
    remaining_tokens_hour: int = 0
    reset_tokens_hour: float = 0.0
    limit_tokens_day: int = 0
    remaining_tokens_day: int = 0
    reset_tokens_day: float = 0.0


@dataclass(slots=True)
class Decision:
    admitted: bool
    kind: str = ""  # why it was refused
    retry_after: float = 0.0
    limit: int = 0
    used: int = 0
    requested: int = 0
    state: WindowState = field(default_factory=WindowState)


@dataclass(frozen=True, slots=True)
class ScopeReading:
    """One scope's windows right now, read without admitting anything (`Backend.peek`).

    `state` is what admission would put in `Decision.state` for this scope at that moment (a
    request looked at but not admitted: expired leases released, windows trimmed, the same
    reset rules), so a page can show exactly what the x-ratelimit-* headers say. The `used_*`
    counts include running reservations. A window without a limit keeps no log (limiter.lua,
    admission), so its used count is 0; the day counter is kept either way. To merge the states
    of several readings (`merge_states`, which changes its first argument), pass copies.
    """

    key: str
    state: WindowState
    used_requests: int
    used_tokens: int
    used_tokens_hour: int
    used_tokens_day: int
    in_flight: int
    max_parallel: int  # 0 = no limit
    cooldown_remaining: float  # seconds until a running cooldown ends; 0.0 if none


def scope_reading(
    scope: Scope,
    used: tuple[int, int, int, int],
    resets: tuple[float, float, float, float],
    in_flight: int,
    cooldown_remaining: float,
) -> ScopeReading:
    """A reading from what a backend counted: `used` and `resets` of requests per minute,
    tokens per minute, per hour and per day, in that order."""
    limits = scope.limits
    requests, tokens, tokens_hour, tokens_day = used
    return ScopeReading(
        key=scope.key,
        state=WindowState(
            limit_requests=limits.requests_per_minute,
            remaining_requests=remaining(limits.requests_per_minute, requests),
            reset_requests=resets[0],
            limit_tokens=limits.tokens_per_minute,
            remaining_tokens=remaining(limits.tokens_per_minute, tokens),
            reset_tokens=resets[1],
            limit_tokens_hour=limits.tokens_per_hour,
            remaining_tokens_hour=remaining(limits.tokens_per_hour, tokens_hour),
            reset_tokens_hour=resets[2],
            limit_tokens_day=limits.tokens_per_day,
            remaining_tokens_day=remaining(limits.tokens_per_day, tokens_day),
            reset_tokens_day=resets[3],
        ),
        used_requests=requests,
        used_tokens=tokens,
        used_tokens_hour=tokens_hour,
        used_tokens_day=tokens_day,
        in_flight=in_flight,
        max_parallel=limits.max_parallel_requests,
        cooldown_remaining=cooldown_remaining,
    )


def remaining(limit: int, used: int) -> int:
    """What is left of a window (0 when it has no limit, as the headers report it)."""
    return max(limit - used, 0) if limit else 0


class Backend(Protocol):
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
        """Reserve `tokens` in every scope, or refuse. With a `floor` (a request whose client
        set no maximum: gateway/app.py) reserve what the token windows still allow, at most
        `tokens` and at least `floor`, in the same atomic step; Decision.requested says how
        much."""
        ...

    async def settle(
        self, scopes: list[Scope], rid: str, tokens: int, now: float, day: Day
    ) -> None: ...

    async def renew(
        self, scopes_by_rid: dict[str, list[Scope]], now: float, lease: float
    ) -> None: ...

    async def peek(self, scopes: list[Scope], now: float, day: Day) -> list[ScopeReading]:
        """One reading per scope, in order; changes nothing any later call sees."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Day:
    """The local calendar day at `now`: its name (for keys) and seconds until it ends."""

    name: str
    ends_in: float

    @classmethod
    def at(cls, now: float, zone: ZoneInfo) -> Day:
        # Every admission and settlement asks; the calendar changes once a day (building the
        # datetimes each time was about 3 % of the gateway's CPU under load, py-spy).
        known = _days.get(zone.key)
        if known is None or not known[0] <= now < known[1]:
            local = datetime.fromtimestamp(now, zone)
            start = datetime.combine(local.date(), datetime.min.time(), zone).timestamp()
            end = datetime.combine(
                local.date() + timedelta(days=1), datetime.min.time(), zone
            ).timestamp()
            known = _days[zone.key] = (start, end, local.strftime("%Y%m%d"))
        return cls(known[2], known[1] - now)


_days: dict[str, tuple[float, float, str]] = {}  # zone → (day start, day end, day name)


def system_clock() -> float:
    return time.time()


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `1h2m3s`, `250ms`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(state: WindowState) -> list[tuple[bytes, bytes]]:
    values = [
        ("x-ratelimit-limit-requests", str(state.limit_requests)),
        ("x-ratelimit-remaining-requests", str(state.remaining_requests)),
        ("x-ratelimit-reset-requests", format_duration(state.reset_requests)),
        ("x-ratelimit-limit-tokens", str(state.limit_tokens)),
        ("x-ratelimit-remaining-tokens", str(state.remaining_tokens)),
        ("x-ratelimit-reset-tokens", format_duration(state.reset_tokens)),
        ("x-ratelimit-limit-tokens-hour", str(state.limit_tokens_hour)),
        ("x-ratelimit-remaining-tokens-hour", str(state.remaining_tokens_hour)),
        ("x-ratelimit-reset-tokens-hour", format_duration(state.reset_tokens_hour)),
        ("x-ratelimit-limit-tokens-day", str(state.limit_tokens_day)),
        ("x-ratelimit-remaining-tokens-day", str(state.remaining_tokens_day)),
        ("x-ratelimit-reset-tokens-day", format_duration(state.reset_tokens_day)),
    ]
    return [(k.encode(), v.encode()) for k, v in values]


def merge_states(states: list[WindowState]) -> WindowState:
    """Headers for several scopes: the tightest remaining of each window wins."""
    merged = states[0]
    for other in states[1:]:
        for window in ("requests", "tokens", "tokens_hour", "tokens_day"):
            if getattr(other, f"remaining_{window}") < getattr(merged, f"remaining_{window}") or (
                getattr(merged, f"limit_{window}") == 0 and getattr(other, f"limit_{window}") > 0
            ):
                for part in ("limit", "remaining", "reset"):
                    setattr(merged, f"{part}_{window}", getattr(other, f"{part}_{window}"))
    return merged


# SGLang's max_tokens when a /v1/completions request sets none (CompletionRequest.max_tokens).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class CompletionBudget:
    """What admission reserves for one request: all the upstream may bill for it."""

    per_choice: int  # the most one choice may generate
    forced_max: int | None  # the max_tokens the gateway sends when the client set none
    reserved: int  # prompt + choices × per_choice


def completion_budget(
    prompt_tokens: int,
    *,
    choices: int,
    max_tokens: int | None,
    min_tokens: int,
    context_length: int,
    default_max: int,
) -> CompletionBudget:
    """Reserve exactly what can be generated, so that admission can never be outrun.

    SGLang bills the prompt once and each choice's completion (n choices, and each prompt of a
    completions batch, generate separately: openai/usage_processor.py), generates at most
    max_tokens per choice (max_completion_tokens first; the caller resolves that), and refuses
    a request whose prompt plus max_tokens reaches the context length. A request without a
    maximum is given one: `default_max` (LIMITER_DEFAULT_MAX_TOKENS for chat, SGLang's 16 for
    completions), raised to min_tokens, within the context; the gateway sends it upstream, so
    what was reserved is what may be generated, whatever the upstream's own default.
    """
    room = max(context_length - prompt_tokens, 0)
    if max_tokens is not None:
        per_choice, forced = min(max_tokens, room), None
    else:
        per_choice = min(max(default_max, min_tokens), max(room - 1, 0))
        forced = per_choice if per_choice > 0 else None
    return CompletionBudget(per_choice, forced, prompt_tokens + choices * per_choice)
