"""The prefill gate (gateway/prefill_gate.py): at most N of a user's requests awaiting their
first token, slots handed on in order, a bounded wait, the client leaving; and its use by the
scheduler: a streamed request's slot frees at its first token, a non-streamed one's after its
prompt's estimated prefill."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import prefill_gate
from gateway.asgi_io import ClientDisconnected
from gateway.prefill_gate import PrefillGate
from gateway.scheduling import Scheduler, Shape
from tests.gateway.test_scheduling import MODEL, grant, model, stays
from tokenlimit.fair_queue import MemoryFairQueue

KEY = ("model", "user")


def test_slots_are_handed_on_in_order() -> None:
    async def run() -> None:
        gate = PrefillGate()
        assert await gate.enter(KEY, 2, stays) and await gate.enter(KEY, 2, stays)
        third = asyncio.ensure_future(gate.enter(KEY, 2, stays))
        fourth = asyncio.ensure_future(gate.enter(KEY, 2, stays))
        await asyncio.sleep(0.01)
        assert not third.done() and not fourth.done()
        assert await gate.enter(("model", "other"), 2, stays)  # another user is not held up
        gate.leave(KEY)
        assert await asyncio.wait_for(third, 1) is True
        assert not fourth.done() and gate.holding(KEY) == 2
        gate.leave(KEY)
        assert await asyncio.wait_for(fourth, 1) is True
        for _ in range(2):
            gate.leave(KEY)
        assert gate.holding(KEY) == 0
        gate.leave(("model", "other"))
        assert gate._slots == {}  # idle users are forgotten

    asyncio.run(run())


def test_a_slot_never_freed_stops_holding_the_next_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefill_gate, "PREFILL_WAIT_MAX_SECONDS", 0.05)

    async def run() -> None:
        gate = PrefillGate()
        assert await gate.enter(KEY, 1, stays)
        assert await gate.enter(KEY, 1, stays) is False  # went on without a slot
        assert gate.holding(KEY) == 1 and not gate._slots[KEY].waiting
        gate.leave(KEY)
        assert gate._slots == {}

    asyncio.run(run())


def test_a_client_that_leaves_while_waiting_leaves_the_gate() -> None:
    async def run() -> None:
        gate = PrefillGate()
        left = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await left.wait()
            return {"type": "http.disconnect"}

        assert await gate.enter(KEY, 1, stays)
        waiting = asyncio.ensure_future(gate.enter(KEY, 1, receive))
        await asyncio.sleep(0.01)
        left.set()
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(waiting, 1)
        assert not gate._slots[KEY].waiting and gate.holding(KEY) == 1
        assert await gate.enter(KEY, 0, stays) is False  # 0: the gate is off

    asyncio.run(run())


@pytest.mark.parametrize("streamed", [True, False])
def test_the_schedulers_place_holds_a_slot_until_the_first_token(
    settings: Any, streamed: bool
) -> None:
    settings.GATEWAY_QUEUE_PREFILLS_PER_USER = 1
    scheduler = Scheduler(MemoryFairQueue())
    shape = Shape(streamed, prompt_tokens=2000)  # non-streamed: 0.2 s of estimated prefill

    async def run() -> None:
        first = await scheduler.acquire(model(8), grant(1), "first", 10, stays, shape)
        second = asyncio.ensure_future(
            scheduler.acquire(model(8), grant(1), "second", 10, stays, shape)
        )
        await asyncio.sleep(0.05)
        assert not second.done()  # a place is free; the user's prefill slot is not
        if streamed:
            first.prefilled()  # the first token arrived
        place = await asyncio.wait_for(second, 2)
        assert place.prefilling == (MODEL, "1")
        for held in (first, place):
            await held.release()
        assert scheduler.gate._slots == {}

    asyncio.run(run())
