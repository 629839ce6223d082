"""Where a request's CPU work happens: parsing, checking, rendering and counting, off the loop.

Every chat template renders and every prompt is tokenized on a worker thread, inside the chat
template budget (tokenlimit/chat_templates.py), so no request can stall the event loop that serves
the others. Tokenizing releases the GIL (encode_batch, tokenlimit/tokens.py), so the loop keeps
running while a long prompt is counted.

No client may hold up the others' preparation either. Small bodies (the many) are prepared on
the fast pool with a short template budget; a render that runs past it (a huge body, a
pathological conversation, a runaway template) moves to the bulk pool with the full budget. Both
pools serve users in turn (FairPool): a client with a hundred requests waiting is not ahead of
everyone else for all of them.
Bodies up to BULK_BYTES are parsed on the loop (orjson: about 0.1 ms for 64 KiB); larger ones
on the bulk pool too.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.conf import settings

from gateway.caches import ModelInfo
from gateway.errors import GatewayError, invalid
from gateway.request_schema import parse_json_object
from tokenlimit import chat_templates
from tokenlimit.chat_templates import TemplateBudgetExceeded
from tokenlimit.tokens import CounterKey, TokenCounter, get_counter

log = logging.getLogger(__name__)
T = TypeVar("T")

BULK_BYTES = 64 * 1024
# Real templates render a 64 KiB conversation in a few milliseconds (about 40 µs a message,
# docs/benchmarks.md); past this a render leaves the fast pool.
FAST_TEMPLATE_SECONDS = 0.05

# Loading a tokenizer takes about a second: never in a pool requests wait on.
_load_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer-load")


def _budgeted(seconds: float, fn: Callable[..., T], *args: Any) -> T:
    # A rendered prompt is made of the body's text plus the template's own: four times the
    # largest body is far more than any real template produces.
    with chat_templates.budget(seconds, 4 * settings.GATEWAY_MAX_BODY_BYTES):
        return fn(*args)


def template_too_costly(exc: TemplateBudgetExceeded) -> GatewayError:
    return invalid(
        f"The model's chat template could not render this conversation within the gateway's "
        f"budget ({exc}); shorten the conversation or its tool definitions.",
        param="messages",
        code="template_budget_exceeded",
    )


class FairPool:
    """Worker threads whose waiting work is served user by user, in turn.

    A plain executor queue is first come, first served: a client that sends a hundred slow
    requests at once is ahead of everyone else for all of them. Here work waits in one queue
    per user, and each free thread goes to the next user in turn, so anyone else's request
    waits for at most one job per busy user; `per_user` caps the threads one user may hold at
    once (a second thread running one user's runaway template would take GIL time from
    everyone). The threads take jobs from a SimpleQueue and hand results back with
    call_soon_threadsafe: half the CPU of run_in_executor's futures per hop
    (docs/benchmarks.md), which every request pays.
    """

    def __init__(self, threads: int, name: str, per_user: int | None = None) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._free = threads
        self._per_user = per_user or threads
        self._running: dict[int, int] = {}
        self._waiting: OrderedDict[int, deque[asyncio.Future[None]]] = OrderedDict()
        for number in range(threads):
            threading.Thread(target=self._work, name=f"{name}_{number}", daemon=True).start()

    async def run(self, user_id: int, fn: Callable[..., T], *args: Any) -> T:
        await self._acquire(user_id)
        try:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[T] = loop.create_future()
            self._jobs.put((loop, done, fn, args))
            return await done
        finally:
            self._finished(user_id)

    def _work(self) -> None:
        while True:
            loop, done, fn, args = self._jobs.get()
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting request, as an executor would
                loop.call_soon_threadsafe(_settle, done, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

    async def _acquire(self, user_id: int) -> None:
        if self._free and not self._waiting and self._running.get(user_id, 0) < self._per_user:
            self._start(user_id)
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user_id, deque()).append(turn)
        self._dispatch()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._finished(user_id)  # a thread was handed over as we were cancelled
            else:
                self._forget(user_id, turn)
            raise

    def _start(self, user_id: int) -> None:
        self._free -= 1
        self._running[user_id] = self._running.get(user_id, 0) + 1

    def _finished(self, user_id: int) -> None:
        self._free += 1
        left = self._running[user_id] - 1
        if left:
            self._running[user_id] = left
        else:
            del self._running[user_id]
        self._dispatch()

    def _dispatch(self) -> None:
        """Free threads to waiting users in turn, passing over users at their cap."""
        while self._free and self._waiting:
            ready = next(
                (u for u in self._waiting if self._running.get(u, 0) < self._per_user), None
            )
            if ready is None:
                return
            queue_ = self._waiting[ready]
            turn = queue_.popleft()
            if queue_:
                self._waiting.move_to_end(ready)
            else:
                del self._waiting[ready]
            if not turn.done():
                self._start(ready)
                turn.set_result(None)

    def _forget(self, user_id: int, turn: asyncio.Future[None]) -> None:
        queue_ = self._waiting.get(user_id)
        if queue_ is not None and turn in queue_:
            queue_.remove(turn)
            if not queue_:
                del self._waiting[user_id]


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.cancelled():  # the request went away while its job ran
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


def counting_key(model: ModelInfo) -> CounterKey:
    """Everything about a served model that changes its counts: a change in the admin gives a
    new key, so the next catalog reload (every GATEWAY_KEY_CACHE_SECONDS) brings a new counter."""
    return (
        model.name, model.tokenizer, model.korean_factor, model.chat_template, model.estimator_fit
    )  # fmt: skip


def counter_for(model: ModelInfo) -> TokenCounter:
    """The model's counter, built from exactly what counting_key names."""
    name, tokenizer, korean_factor, template, fit = counting_key(model)
    return get_counter(name, tokenizer, korean_factor, chat_template=template, estimator_fit=fit)


class Counters:
    def __init__(self) -> None:
        self._ready: dict[CounterKey, TokenCounter] = {}
        self.fast = FairPool(2, "prepare")
        self.bulk = FairPool(2, "prepare-bulk", per_user=1)

    def preload(self, models: tuple[ModelInfo, ...]) -> None:
        """Start loading every model's tokenizer in the background (called on catalog loads)."""
        for model in models:
            if counting_key(model) not in self._ready:
                _load_executor.submit(self._load_sync, model)

    def source(self, model: ModelInfo) -> str:
        counter = self._ready.get(counting_key(model))
        return counter.source if counter is not None else "loading"

    def problem(self, model: ModelInfo) -> str:
        """What is wrong with the model's counting ("" when nothing, or not loaded yet)."""
        counter = self._ready.get(counting_key(model))
        return counter.problem if counter is not None else ""

    async def get(self, model: ModelInfo) -> TokenCounter:
        counter = self._ready.get(counting_key(model))
        if counter is not None:
            return counter
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_load_executor, self._load_sync, model)

    def _load_sync(self, model: ModelInfo) -> TokenCounter:
        counter = counter_for(model)
        self._ready[counting_key(model)] = counter
        gc.freeze()  # the tokenizer lives as long as the process: see limiter_site/asgi.py
        return counter

    async def prepare(self, size: int, user_id: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` (a request's preparation) on the fast pool, or on the bulk pool if the
        body is large or its template outruns the fast budget; each pool serves users in turn."""
        if size <= BULK_BYTES:
            try:
                return await self.fast.run(user_id, _budgeted, FAST_TEMPLATE_SECONDS, fn, *args)
            except TemplateBudgetExceeded as exc:
                if not exc.out_of_time:
                    raise template_too_costly(exc) from None
        budget = settings.GATEWAY_TEMPLATE_BUDGET_SECONDS
        try:
            return await self.bulk.run(user_id, _budgeted, budget, fn, *args)
        except TemplateBudgetExceeded as exc:
            raise template_too_costly(exc) from None

    async def run(self, user_id: int, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the user's turn on the pool for `size` bytes (no template involved)."""
        pool = self.fast if size <= BULK_BYTES else self.bulk
        return await pool.run(user_id, fn, *args)

    async def parse(self, user_id: int, body: bytes) -> dict[str, Any]:
        if len(body) <= BULK_BYTES:
            return parse_json_object(body)
        return await self.run(user_id, len(body), parse_json_object, body)

    async def count_completion(self, user_id: int, model: ModelInfo, text: str) -> int:
        """Generated text the upstream billed nothing for; counted like prompts."""
        counter = await self.get(model)
        return await self.run(user_id, len(text) * 3, counter.count_completion, text)
