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
from tests.gateway.test_scheduling import grant, model, stays
from tokenlimit.fair_queue import MemoryFairQueue

KEY = ("model", "user")


def test_slots_are_handed_on_in_order() -> None:
    async def run() -> None:
        gate = PrefillGate()
        first, second = [await gate.enter(KEY, 2, 0, stays) for _ in range(2)]
        assert first.slot and second.slot and not first.first  # no hold: nobody is "first"
        third = asyncio.ensure_future(gate.enter(KEY, 2, 0, stays))
        fourth = asyncio.ensure_future(gate.enter(KEY, 2, 0, stays))
        await asyncio.sleep(0.01)
        assert not third.done() and not fourth.done()
        other = await gate.enter(("model", "other"), 2, 0, stays)  # not held up
        assert other.slot
        first.prefilled()
        assert (await asyncio.wait_for(third, 1)).slot
        assert not fourth.done() and gate.holding(KEY) == 2
        second.ended()  # ending frees its slot too
        last = await asyncio.wait_for(fourth, 1)
        assert last.slot and gate.holding(KEY) == 2
        for entry in (first, second, third.result(), last, other):
            entry.ended()
            entry.ended()  # twice is once
        assert gate._users == {}  # idle users are forgotten

    asyncio.run(run())


def test_a_slot_never_freed_stops_holding_the_next_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefill_gate, "PREFILL_WAIT_MAX_SECONDS", 0.05)

    async def run() -> None:
        gate = PrefillGate()
        held = await gate.enter(KEY, 1, 0, stays)
        unheld = await gate.enter(KEY, 1, 0, stays)
        assert held.slot and not unheld.slot  # went on without a slot
        assert gate.holding(KEY) == 1 and not gate._users[KEY].waiting
        held.ended()
        unheld.ended()
        assert gate._users == {}

    asyncio.run(run())


def leaves_when(left: asyncio.Event) -> Any:
    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    return receive


def test_a_client_that_leaves_while_waiting_leaves_the_gate() -> None:
    async def run() -> None:
        gate = PrefillGate()
        left = asyncio.Event()
        held = await gate.enter(KEY, 1, 0, stays)
        waiting = asyncio.ensure_future(gate.enter(KEY, 1, 0, leaves_when(left)))
        await asyncio.sleep(0.01)
        left.set()
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(waiting, 1)
        assert not gate._users[KEY].waiting and gate.holding(KEY) == 1
        assert gate._users[KEY].active == 1  # the one that left no longer counts
        off = await gate.enter(KEY, 0, 0, stays)  # both rules off: a pass that holds nothing
        assert off.gate is None and not off.slot
        held.ended()
        assert gate._users == {}

    asyncio.run(run())


BUSY, LIGHT, OTHER_LIGHT = ("model", "busy"), ("model", "light"), ("model", "light2")


def test_a_busy_users_new_request_waits_for_another_users_only_request() -> None:
    async def run() -> None:
        gate = PrefillGate()
        running = await gate.enter(BUSY, 2, 1.0, stays)
        assert running.first  # its user's only request
        own = await asyncio.wait_for(gate.enter(BUSY, 2, 1.0, stays), 0.05)
        assert not own.first  # a user never waits for its own first token here
        running.prefilled()
        own.ended()
        light = await gate.enter(LIGHT, 2, 1.0, stays)
        other_light = await gate.enter(OTHER_LIGHT, 2, 1.0, stays)
        assert light.first and other_light.first and gate.awaiting_first_tokens("model") == 2
        elsewhere = await gate.enter(("elsewhere", "busy"), 2, 1.0, stays)
        assert elsewhere.first  # another model's: it holds nobody here
        busy_next = asyncio.ensure_future(gate.enter(BUSY, 2, 1.0, stays))
        await asyncio.sleep(0.05)
        assert not busy_next.done()  # the busy user's next prompt waits for both lights
        light.prefilled()
        await asyncio.sleep(0.05)
        assert not busy_next.done()
        second_light = await gate.enter(LIGHT, 2, 1.0, stays)  # the light user is busy now
        assert not second_light.first and gate.awaiting_first_tokens("model") == 1
        other_light.ended()  # ended before a first token (an error): no longer awaited
        entry = await asyncio.wait_for(busy_next, 1)
        assert entry.slot and not entry.first and gate.awaiting_first_tokens("model") == 0
        for held in (running, light, second_light, entry, elsewhere):
            held.ended()
        assert gate._users == {} and gate._firsts == {}

    asyncio.run(run())


def test_a_slot_handed_on_still_waits_for_a_light_users_first_token() -> None:
    """The hold comes last, just before the request is sent: a busy user's request that
    waited for its own slot does not go beside a light prompt that came in meanwhile."""

    async def run() -> None:
        gate = PrefillGate()
        running = await gate.enter(BUSY, 1, 1.0, stays)
        queued = asyncio.ensure_future(gate.enter(BUSY, 1, 1.0, stays))
        await asyncio.sleep(0.01)
        light = await gate.enter(LIGHT, 1, 1.0, stays)
        running.prefilled()  # the busy user's slot goes to `queued`...
        await asyncio.sleep(0.05)
        assert not queued.done() and gate.holding(BUSY) == 1  # ...which waits for light's
        light.prefilled()
        entry = await asyncio.wait_for(queued, 1)
        assert entry.slot
        for held in (running, light, entry):
            held.ended()
        assert gate._users == {} and gate._firsts == {}

    asyncio.run(run())


def test_the_hold_is_bounded_off_at_zero_and_left_by_a_leaving_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def run() -> None:
        gate = PrefillGate()
        running = await gate.enter(BUSY, 0, 0.1, stays)  # no slots, the hold alone
        running.prefilled()
        light = await gate.enter(LIGHT, 0, 0.1, stays)
        loop = asyncio.get_running_loop()
        started = loop.time()
        late = await gate.enter(BUSY, 0, 0.1, stays)  # goes after the bound, not before
        assert loop.time() - started >= 0.09 and not late.slot and not late.first
        unheld = await asyncio.wait_for(gate.enter(BUSY, 0, 0, stays), 0.05)  # hold 0: off
        assert unheld.gate is None
        left = asyncio.Event()
        leaving = asyncio.ensure_future(gate.enter(BUSY, 0, 5.0, leaves_when(left)))
        await asyncio.sleep(0.01)
        left.set()
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(leaving, 1)
        assert gate._users[BUSY].active == 2  # `running` and `late`
        for held in (running, light, late):
            held.ended()
        assert gate._users == {} and gate._firsts == {}

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
        assert place.admitted is not None and place.admitted.slot
        for held in (first, place):
            await held.release()
        assert scheduler.gate._users == {} and scheduler.gate._firsts == {}

    asyncio.run(run())


def test_the_schedulers_busy_user_waits_for_a_light_users_first_token(settings: Any) -> None:
    settings.GATEWAY_QUEUE_PREFILLS_PER_USER = 2
    settings.GATEWAY_QUEUE_FIRST_REQUEST_HOLD_SECONDS = 5.0
    scheduler = Scheduler(MemoryFairQueue())

    async def run() -> None:
        running = await scheduler.acquire(model(8), grant(1), "running", 10, stays)
        running.prefilled()
        light = await scheduler.acquire(model(8), grant(2), "light", 10, stays)
        busy_next = asyncio.ensure_future(scheduler.acquire(model(8), grant(1), "next", 10, stays))
        await asyncio.sleep(0.05)
        assert not busy_next.done()  # places and a prefill slot are free: the hold it is
        light.prefilled()
        place = await asyncio.wait_for(busy_next, 1)
        for held in (running, light, place):
            await held.release()
        assert scheduler.gate._users == {} and scheduler.gate._firsts == {}

    asyncio.run(run())
