"""At most a few of one user's requests in prefill at once, on a model with places upstream.

Places (gateway/scheduling.py) bound how many requests a server runs; they do not bound how
much prompt it must prefill at one moment. A server prefills every newly admitted prompt
before their first tokens, in chunks of up to `--chunked-prefill-size` tokens a step: when a
user's long requests end together and the next ones start together, ten 1,000-token prompts
make the next steps last half a second or more each, and an interactive user's short prompt
admitted behind them waits that long for its first token (bench/fairness_bench.py measured it:
the light users' TTFT p90 stayed above a second with places alone).

So a gateway lets at most GATEWAY_QUEUE_PREFILLS_PER_USER of one user's requests on one model
await their first token at once; the next waits here until one of them has it. A streamed
request's slot frees at its first token; a non-streamed one's after the time its prompt takes
to prefill on a typical GPU (NON_STREAMED_PREFILL_MS_PER_TOKEN: the gateway sees no first token
of a whole answer), or when it ends. Prefill is compute-bound, so a user's prompts prefilled
one after the other take about as long as prefilled together: the user loses little, and other
users' short prompts no longer queue behind a burst.

Per gateway process (N gateways: at most N × the setting per user), in memory, no Redis call.
A slot not freed within PREFILL_WAIT_MAX_SECONDS (a server that never sends a first token)
stops holding the next request back: it goes on without one.
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
class _Slots:
    held: int = 0
    waiting: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class PrefillGate:
    def __init__(self) -> None:
        self._slots: dict[Key, _Slots] = {}

    def holding(self, key: Key) -> int:
        slots = self._slots.get(key)
        return slots.held if slots is not None else 0

    async def enter(self, key: Key, per_user: int, receive: Receive) -> bool:
        """True: a slot is held (give it back with `leave`); False: none (the gate is off, or
        the wait ran out). ClientDisconnected if the client leaves while waiting."""
        if per_user <= 0:
            return False
        slots = self._slots.setdefault(key, _Slots())
        if slots.held < per_user:
            slots.held += 1
            return True
        turn = asyncio.get_running_loop().create_future()
        slots.waiting.append(turn)
        disconnect = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({turn, disconnect}, timeout=PREFILL_WAIT_MAX_SECONDS,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            disconnect.cancel()
        if turn.done():  # handed over by `leave`: held (even if the client just left)
            if disconnect.done() and not disconnect.cancelled():
                self.leave(key)
                raise ClientDisconnected()
            return True
        turn.cancel()
        slots.waiting.remove(turn)
        self._forget_if_idle(key, slots)
        if disconnect.done() and not disconnect.cancelled():
            raise ClientDisconnected()
        return False

    def leave(self, key: Key) -> None:
        """A slot given back: to the next waiter, if any, else freed."""
        slots = self._slots.get(key)
        if slots is None:
            return
        while slots.waiting:
            turn = slots.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        slots.held = max(slots.held - 1, 0)
        self._forget_if_idle(key, slots)

    def _forget_if_idle(self, key: Key, slots: _Slots) -> None:
        if not slots.held and not slots.waiting:
            self._slots.pop(key, None)  # users are unbounded: keep only the busy ones


def non_streamed_prefill_seconds(prompt_tokens: int) -> float:
    return prompt_tokens * NON_STREAMED_PREFILL_MS_PER_TOKEN / 1000.0
