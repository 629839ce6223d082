"""The embedded limiter backend: one process, no Redis (the quick start).

It is the reference implementation of the algorithm in tokenlimit/limiter.lua, line for line in
the same order, so that the contract tests in tests/tokenlimit/test_limiter_contract.py hold
both to identical answers.

Thread safety: the gateway's event loop runs every operation to its end without an await, so
operations never interleave on the loop; but a Django view (`gateway.limits.read_live_state`)
peeks from a worker thread of the same process. Each operation therefore holds one lock for its
whole body. Uncontended it costs well under a microsecond a decision; a peek holds it only for
the scopes it reads (its cost grows with the expired entries and leases, as admission's does).
A lock-free snapshot would have to copy a scope's whole hour log on every read instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from tokenlimit.limiter import (
    COOLDOWN,
    HOUR,
    MINUTE,
    PARALLEL,
    REQUESTS,
    STARTS_COOLDOWN,
    TOKENS,
    TOKENS_DAY,
    TOKENS_HOUR,
    TOO_LARGE,
    Day,
    Decision,
    Scope,
    ScopeReading,
    WindowState,
    merge_states,
    remaining,
    scope_reading,
)


@dataclass
class TokenLog:
    """A sliding log: entry id → [time, tokens], oldest first, with a running total."""

    window: float
    entries: dict[str, list[float]] = field(default_factory=dict)
    total: int = 0

    def trim(self, now: float) -> None:
        # Entries are in time order, so only the expired head is visited: O(1) amortised.
        while self.entries:
            entry_id = next(iter(self.entries))
            when, amount = self.entries[entry_id]
            if when > now - self.window:
                break
            self.total -= int(amount)
            del self.entries[entry_id]
        self.total = max(self.total, 0)

    def add(self, entry_id: str, now: float, amount: int) -> None:
        self.entries[entry_id] = [now, amount]
        self.total += amount

    def retry_after(self, now: float, needed: int, limit: int) -> float:
        """Seconds until enough entries leave the window for `needed` more to fit."""
        excess = self.total + needed - limit
        for when, amount in self.entries.values():
            excess -= int(amount)
            if excess <= 0:
                return when + self.window - now
        return self.window

    def reset_in(self, now: float) -> float:
        if not self.entries:
            return 0.0
        newest = next(reversed(self.entries.values()))[0]  # entries are in time order
        return newest + self.window - now


@dataclass
class ScopeState:
    requests: TokenLog = field(default_factory=lambda: TokenLog(MINUTE))
    minute: TokenLog = field(default_factory=lambda: TokenLog(MINUTE))
    hour: TokenLog = field(default_factory=lambda: TokenLog(HOUR))
    day_name: str = ""
    day_total: int = 0
    leases: dict[str, float] = field(default_factory=dict)
    # rid → (tokens reserved, day name)
    reservations: dict[str, tuple[int, str]] = field(default_factory=dict)
    cooldown_until: float = 0.0


MAX_ROOM = 2**53  # no token window: no bound from this scope


class MemoryBackend:
    def __init__(self) -> None:
        self.scopes: dict[str, ScopeState] = {}
        self._lock = threading.Lock()

    async def close(self) -> None:
        """Nothing to close: the state lives in this process."""

    def _state(self, scope: Scope, now: float, day: Day) -> ScopeState:
        state = self.scopes.setdefault(scope.key, ScopeState())
        if state.day_name != day.name:
            state.day_name, state.day_total = day.name, 0
        for rid in [r for r, until in state.leases.items() if until <= now]:
            _release(state, rid)
        state.requests.trim(now)
        state.minute.trim(now)
        state.hour.trim(now)
        return state

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
        with self._lock:
            return self._admit(scopes, rid, tokens, now, lease, day, floor)

    def _admit(
        self,
        scopes: list[Scope],
        rid: str,
        tokens: int,
        now: float,
        lease: float,
        day: Day,
        floor: int = 0,
    ) -> Decision:
        states = [self._state(scope, now, day) for scope in scopes]
        if floor > 0:
            rooms = [_room(scope, state) for scope, state in zip(scopes, states, strict=True)]
            tokens = max(min(tokens, *rooms), floor)
        for scope, state in zip(scopes, states, strict=True):
            refusal = _check(scope, state, tokens, now, day)
            if refusal is not None:
                if refusal.kind in STARTS_COOLDOWN and scope.limits.cooldown_minutes > 0:
                    cooldown = scope.limits.cooldown_minutes * 60.0
                    state.cooldown_until = now + cooldown
                    refusal.retry_after = max(refusal.retry_after, cooldown)
                refusal.state = merge_states(
                    [_window_state(s, st, now, day) for s, st in zip(scopes, states, strict=True)]
                )
                return refusal
        for scope, state in zip(scopes, states, strict=True):
            # A window without a limit keeps no log: an unlimited user costs no memory.
            if scope.limits.requests_per_minute:
                state.requests.add(rid, now, 1)
            if scope.limits.tokens_per_minute:
                state.minute.add(rid, now, tokens)
            if scope.limits.tokens_per_hour:
                state.hour.add(rid, now, tokens)
            state.day_total += tokens
            state.leases[rid] = now + lease
            state.reservations[rid] = (tokens, day.name)
        return Decision(
            admitted=True,
            requested=tokens,
            state=merge_states(
                [_window_state(s, st, now, day) for s, st in zip(scopes, states, strict=True)]
            ),
        )

    async def settle(
        self, scopes: list[Scope], rid: str, tokens: int, now: float, day: Day
    ) -> None:
        with self._lock:
            self._settle(scopes, rid, tokens, now, day)

    def _settle(self, scopes: list[Scope], rid: str, tokens: int, now: float, day: Day) -> None:
        for scope in scopes:
            state = self._state(scope, now, day)
            reserved, reserved_day = state.reservations.pop(rid, (0, ""))
            state.leases.pop(rid, None)
            delta = tokens - reserved
            for log, limit in (
                (state.minute, scope.limits.tokens_per_minute),
                (state.hour, scope.limits.tokens_per_hour),
            ):
                if limit:
                    _adjust(log, rid, delta, now)
            state.day_total = max(state.day_total + _day_change(reserved_day, day, delta), 0)

    async def renew(self, scopes_by_rid: dict[str, list[Scope]], now: float, lease: float) -> None:
        with self._lock:
            for rid, scopes in scopes_by_rid.items():
                for scope in scopes:
                    state = self.scopes.get(scope.key)
                    if state is not None and rid in state.leases:
                        state.leases[rid] = now + lease

    async def peek(self, scopes: list[Scope], now: float, day: Day) -> list[ScopeReading]:
        return self.peek_sync(scopes, now, day)

    def peek_sync(self, scopes: list[Scope], now: float, day: Day) -> list[ScopeReading]:
        """`peek` for synchronous callers (a Django view in a worker thread)."""
        with self._lock:
            return [_peek(scope, self.scopes.get(scope.key), now, day) for scope in scopes]


def _adjust(log: TokenLog, rid: str, delta: int, now: float) -> None:
    entry = log.entries.get(rid)
    if entry is not None:
        change = max(delta, -int(entry[1]))
        entry[1] += change
        log.total = max(log.total + change, 0)
    elif delta > 0:
        # The reservation already left this window: charge the overrun now, never lose it.
        log.add(f"{rid}+", now, delta)


def _day_change(reserved_day: str, day: Day, delta: int) -> int:
    if reserved_day == day.name or reserved_day == "":
        return delta  # same day, or the reservation was already released: charge what was used
    return max(delta, 0)  # reserved yesterday: today only pays an overrun


def _release(state: ScopeState, rid: str) -> None:
    """A lease ran out (its gateway died): give back the slot and every reserved token."""
    reserved, reserved_day = state.reservations.pop(rid, (0, ""))
    del state.leases[rid]
    for log in (state.minute, state.hour):
        _adjust(log, rid, -reserved, 0.0)
    if reserved_day == state.day_name:
        state.day_total = max(state.day_total - reserved, 0)


def _peek(scope: Scope, state: ScopeState | None, now: float, day: Day) -> ScopeReading:
    """What `_state` then `_window_state` would report at `now`, with nothing changed: the day
    rollover, the release of expired leases and the trimming are worked out on the side. Peeking
    writes nothing, so a reader whose clock runs ahead of the gateways' (another process) can
    never release a lease or drop an entry they still count."""
    if state is None:
        return scope_reading(scope, (0, 0, 0, 0), (0.0, 0.0, 0.0, 0.0), 0, 0.0)
    day_total = state.day_total if state.day_name == day.name else 0
    minute, hour = _LogView(state.minute), _LogView(state.hour)
    in_flight = 0
    for rid, until in state.leases.items():  # `_release`, in the same order
        if until > now:
            in_flight += 1
            continue
        reserved, reserved_day = state.reservations.get(rid, (0, ""))
        minute.release(rid, reserved)
        hour.release(rid, reserved)
        if reserved_day == day.name:
            day_total = max(day_total - reserved, 0)
    requests_used, requests_reset = _LogView(state.requests).trimmed(now)
    minute_used, minute_reset = minute.trimmed(now)
    hour_used, hour_reset = hour.trimmed(now)
    cooldown = state.cooldown_until - now if state.cooldown_until > now else 0.0
    return scope_reading(
        scope,
        (requests_used, minute_used, hour_used, day_total),
        (requests_reset, minute_reset, hour_reset, day.ends_in if day_total else 0.0),
        in_flight,
        cooldown,
    )


class _LogView:
    """A token log as `_release` and `trim` would leave it, worked out without changing it."""

    def __init__(self, log: TokenLog) -> None:
        self.log = log
        self.total = log.total
        self.amounts: dict[str, int] = {}  # entries whose amount a release would change

    def release(self, rid: str, reserved: int) -> None:
        # `_adjust(log, rid, -reserved, …)`: a negative change never adds an entry.
        entry = self.log.entries.get(rid)
        if entry is not None:
            amount = self.amounts.get(rid, int(entry[1]))
            change = max(-reserved, -amount)
            self.amounts[rid] = amount + change
            self.total = max(self.total + change, 0)

    def trimmed(self, now: float) -> tuple[int, float]:
        """`trim(now)`, then (total, `reset_in(now)`)."""
        total, kept = self.total, False
        for entry_id, (when, amount) in self.log.entries.items():
            if when > now - self.log.window:
                kept = True
                break
            total -= self.amounts.get(entry_id, int(amount))
        total = max(total, 0)
        if not kept:
            return total, 0.0
        newest = next(reversed(self.log.entries.values()))[0]
        return total, newest + self.log.window - now


def _room(scope: Scope, state: ScopeState) -> int:
    """The tokens the scope's token windows still allow (limiter.lua's `room`)."""
    limits, room = scope.limits, MAX_ROOM
    for limit, used in (
        (limits.tokens_per_minute, state.minute.total),
        (limits.tokens_per_hour, state.hour.total),
        (limits.tokens_per_day, state.day_total),
    ):
        if limit:
            room = min(room, limit - used)
    return room


def _check(scope: Scope, state: ScopeState, tokens: int, now: float, day: Day) -> Decision | None:
    limits = scope.limits
    if state.cooldown_until > now:
        return Decision(False, COOLDOWN, state.cooldown_until - now, requested=tokens)
    for limit in (limits.tokens_per_minute, limits.tokens_per_hour, limits.tokens_per_day):
        if limit and tokens > limit:
            return Decision(False, TOO_LARGE, 0.0, limit=limit, used=0, requested=tokens)
    if limits.tokens_per_day and state.day_total + tokens > limits.tokens_per_day:
        return Decision(
            False, TOKENS_DAY, day.ends_in, limits.tokens_per_day, state.day_total, tokens
        )
    if limits.max_parallel_requests and len(state.leases) >= limits.max_parallel_requests:
        return Decision(False, PARALLEL, 1.0, limits.max_parallel_requests, len(state.leases), 1)
    if limits.requests_per_minute and state.requests.total + 1 > limits.requests_per_minute:
        retry = state.requests.retry_after(now, 1, limits.requests_per_minute)
        return Decision(False, REQUESTS, retry, limits.requests_per_minute, state.requests.total, 1)
    for kind, log, limit in (
        (TOKENS, state.minute, limits.tokens_per_minute),
        (TOKENS_HOUR, state.hour, limits.tokens_per_hour),
    ):
        if limit and log.total + tokens > limit:
            return Decision(
                False, kind, log.retry_after(now, tokens, limit), limit, log.total, tokens
            )
    return None


def _window_state(scope: Scope, state: ScopeState, now: float, day: Day) -> WindowState:
    limits = scope.limits
    return WindowState(
        limit_requests=limits.requests_per_minute,
        remaining_requests=remaining(limits.requests_per_minute, state.requests.total),
        reset_requests=state.requests.reset_in(now),
        limit_tokens=limits.tokens_per_minute,
        remaining_tokens=remaining(limits.tokens_per_minute, state.minute.total),
        reset_tokens=state.minute.reset_in(now),
        limit_tokens_hour=limits.tokens_per_hour,
        remaining_tokens_hour=remaining(limits.tokens_per_hour, state.hour.total),
        reset_tokens_hour=state.hour.reset_in(now),
        limit_tokens_day=limits.tokens_per_day,
        remaining_tokens_day=remaining(limits.tokens_per_day, state.day_total),
        reset_tokens_day=day.ends_in if state.day_total else 0.0,
    )
