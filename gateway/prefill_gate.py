"""Whose prompt a server prefills next, on a model with places upstream.

Places (gateway/scheduling.py) bound how many requests a server runs; they do not bound how
much prompt it must prefill at one moment, nor whose. A server prefills every newly admitted
prompt before its first token, all that fit in `--chunked-prefill-size` tokens in one step
(a GPU forward pass), and a step cannot be interrupted. Two rules, per gateway, in memory:

1. **Prefills a user** (GATEWAY_QUEUE_PREFILLS_PER_USER, default 2, 0 = off): at most that many
   of one user's requests on one model await their first token at once; the next waits here.
   When a user's long requests end together and the next ones start together, ten 1,000-token
   prompts make one step last most of a second, and any short prompt admitted with them waits
   as long (bench/fairness_bench.py measured the light users' TTFT p90 above a second).
2. **A user's only request first** (GATEWAY_QUEUE_FIRST_REQUEST_HOLD_SECONDS, default 1 s,
   0 = off): while a request that is its user's only one on the model awaits its first
   token, the new requests of users who already have one there wait (at most that long)
   before they are sent. So an interactive user's prompt is prefilled in a step of its own,
   not beside a busy user's long prompt: its TTFT is then the step under way when it arrives
   plus its own short step. Nothing running is touched; the busy user's decoding goes on, and
   its new prompts are prefilled right after the short one (bench/fairness_bench.py: light
   TTFT p90 86 → 59 ms with long answers, 263 → 252 ms with long prompts; docs/benchmarks.md).

A streamed request's first token is seen by the proxy (`Pass.prefilled`); a non-streamed one's
is assumed after the time its prompt takes to prefill on a typical GPU
(NON_STREAMED_PREFILL_MS_PER_TOKEN: the gateway sees no first token of a whole answer), or
when it ends. Prefill is compute-bound, so a user's prompts prefilled one after the other take
about as long as prefilled together: the busy user loses little.

Per gateway process: N gateways allow N × the per-user setting, and a request is "its user's
only one" as this gateway sees it. Bounded: a slot not freed within PREFILL_WAIT_MAX_SECONDS
(a server that never sends a first token) stops holding the next request back.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from gateway.asgi_io import ClientDisconnected, Receive, wait_for_disconnect

PREFILL_WAIT_MAX_SECONDS = 10.0
# ~10,000 prompt tokens a second: a 7–8B model's prefill on one A100-class GPU (as
# sglang_sim/engine.py's defaults). A slower GPU opens the gate a little early.
NON_STREAMED_PREFILL_MS_PER_TOKEN = 0.1

Key = tuple[str, str]  # (model, user)


@dataclass
class _User:
    """One user's requests on one model, on this gateway."""

    active: int = 0  # entered and not ended
    held: int = 0  # prefill slots held
    waiting: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


@dataclass
class _Firsts:
    """A model's requests that are their user's only one and await their first token (a user
    has at most one: while it is active, the user's next requests are not "only")."""

    users: set[str] = field(default_factory=set)
    fewer: asyncio.Future[None] | None = None  # resolved when one leaves the set


@dataclass
class Pass:
    """A request through the gate: `prefilled()` at its first token, `ended()` when it ends."""

    gate: PrefillGate | None
    key: Key
    slot: bool = False  # holds one of its user's prefill slots
    first: bool = False  # its user's only request: others' new requests wait for its token
    active: bool = True

    def prefilled(self) -> None:
        if self.gate is None:
            return
        if self.slot:
            self.slot = False
            self.gate._free_slot(self.key)
        if self.first:
            self.first = False
            self.gate._first_prefilled(self.key)

    def ended(self) -> None:
        self.prefilled()
        if self.gate is not None and self.active:
            self.active = False
            self.gate._ended(self.key)


class PrefillGate:
    def __init__(self) -> None:
        self._users: dict[Key, _User] = {}
        self._firsts: dict[str, _Firsts] = {}

    def holding(self, key: Key) -> int:
        user = self._users.get(key)
        return user.held if user is not None else 0

    def awaiting_first_tokens(self, model: str) -> int:
        firsts = self._firsts.get(model)
        return len(firsts.users) if firsts is not None else 0

    async def enter(self, key: Key, per_user: int, hold: float, receive: Receive) -> Pass:
        """Waits for the request's turn to be sent (see the module's rules); the pass says what
        it holds. ClientDisconnected if the client leaves while waiting."""
        if per_user <= 0 and hold <= 0:
            return Pass(None, key)
        user = self._users.setdefault(key, _User())
        first = user.active == 0
        user.active += 1
        entry = Pass(self, key)
        try:
            if per_user > 0:
                entry.slot = await self._take_slot(key, user, per_user, receive)
            # Last, just before it is sent: a slot handed on at a first token must not send a
            # long prompt beside the short one that came in meanwhile.
            if not first and hold > 0:
                await self._hold_for_firsts(key, hold, receive)
        except BaseException:
            entry.ended()
            raise
        if first and hold > 0:
            entry.first = True
            self._firsts.setdefault(key[0], _Firsts()).users.add(key[1])
        return entry

    async def _hold_for_firsts(self, key: Key, hold: float, receive: Receive) -> None:
        """Until no other user's only request awaits its first token, at most `hold` s."""
        model, me = key
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold
        disconnect = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            while True:
                firsts = self._firsts.get(model)
                left = deadline - loop.time()
                if firsts is None or not firsts.users - {me} or left <= 0:
                    return
                if firsts.fewer is None or firsts.fewer.get_loop() is not loop:
                    firsts.fewer = loop.create_future()
                await asyncio.wait({firsts.fewer, disconnect}, timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if disconnect.done() and not disconnect.cancelled():
                    raise ClientDisconnected()
        finally:
            disconnect.cancel()

    async def _take_slot(self, key: Key, user: _User, per_user: int, receive: Receive) -> bool:
        """True: a slot is held; False: none (the wait ran out)."""
        if user.held < per_user:
            user.held += 1
            return True
        turn = asyncio.get_running_loop().create_future()
        user.waiting.append(turn)
        disconnect = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({turn, disconnect}, timeout=PREFILL_WAIT_MAX_SECONDS,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            disconnect.cancel()
        if turn.done():  # handed over by `_free_slot`: held (even if the client just left)
            if disconnect.done() and not disconnect.cancelled():
                self._free_slot(key)
                raise ClientDisconnected()
            return True
        turn.cancel()
        user.waiting.remove(turn)
        if disconnect.done() and not disconnect.cancelled():
            raise ClientDisconnected()
        return False

    def _free_slot(self, key: Key) -> None:
        """A slot given back: to the user's next waiter, if any, else freed."""
        user = self._users.get(key)
        if user is None:
            return
        while user.waiting:
            turn = user.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        user.held = max(user.held - 1, 0)

    def _first_prefilled(self, key: Key) -> None:
        model, user = key
        firsts = self._firsts.get(model)
        if firsts is None:
            return
        firsts.users.discard(user)
        if firsts.fewer is not None and not firsts.fewer.done():
            firsts.fewer.set_result(None)  # its waiters look again
        firsts.fewer = None
        if not firsts.users:
            del self._firsts[model]

    def _ended(self, key: Key) -> None:
        user = self._users.get(key)
        if user is None:
            return
        user.active -= 1
        if user.active <= 0 and not user.held and not user.waiting:
            del self._users[key]  # users are unbounded: keep only the busy ones


def non_streamed_prefill_seconds(prompt_tokens: int) -> float:
    return prompt_tokens * NON_STREAMED_PREFILL_MS_PER_TOKEN / 1000.0
