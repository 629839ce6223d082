"""The embedded limiter backend: one process, no Redis (the quick start).

It is the reference implementation of the algorithm in tokenlimit/limiter.lua, line for line in
the same order, so that the contract tests in tests/quotas/test_limiter_contract.py can hold
both to identical answers.
"""

from __future__ import annotations

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
    WindowState,
    merge_states,
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


class MemoryBackend:
    def __init__(self) -> None:
        self.scopes: dict[str, ScopeState] = {}

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
        self, scopes: list[Scope], rid: str, tokens: int, now: float, lease: float, day: Day
    ) -> Decision:
        states = [self._state(scope, now, day) for scope in scopes]
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
        for rid, scopes in scopes_by_rid.items():
            for scope in scopes:
                state = self.scopes.get(scope.key)
                if state is not None and rid in state.leases:
                    state.leases[rid] = now + lease


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
        remaining_requests=_remaining(limits.requests_per_minute, state.requests.total),
        reset_requests=state.requests.reset_in(now),
        limit_tokens=limits.tokens_per_minute,
        remaining_tokens=_remaining(limits.tokens_per_minute, state.minute.total),
        reset_tokens=state.minute.reset_in(now),
        limit_tokens_hour=limits.tokens_per_hour,
        remaining_tokens_hour=_remaining(limits.tokens_per_hour, state.hour.total),
        reset_tokens_hour=state.hour.reset_in(now),
        limit_tokens_day=limits.tokens_per_day,
        remaining_tokens_day=_remaining(limits.tokens_per_day, state.day_total),
        reset_tokens_day=day.ends_in if state.day_total else 0.0,
    )


def _remaining(limit: int, used: int) -> int:
    return max(limit - used, 0) if limit else 0
