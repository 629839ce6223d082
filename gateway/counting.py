"""Where a request's CPU work happens: parsing, checking, rendering and counting, off the loop.

Every chat template renders and every prompt is tokenized on a worker thread, inside the chat
template budget (quotas/chat_templates.py), so no request can stall the event loop that serves
the others. Tokenizing releases the GIL (encode_batch, quotas/tokens.py), so the loop keeps
running while a long prompt is counted.

No client may hold up the others' preparation either. Small bodies (the many) are prepared on
the fast pool with a short template budget; a render that runs past it (a huge body, a
pathological conversation, a runaway template) moves to the bulk pool with the full budget,
where each user's requests take turns: one user's slow work never occupies every thread.
Bodies up to BULK_BYTES are parsed on the loop (orjson: about 0.1 ms for 64 KiB); larger ones
on the bulk pool too.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from django.conf import settings

from gateway.caches import ModelInfo
from gateway.errors import GatewayError, invalid
from gateway.request_schema import parse_json_object
from quotas import chat_templates
from quotas.chat_templates import TemplateBudgetExceeded
from quotas.tokens import TokenCounter, get_counter

log = logging.getLogger(__name__)
T = TypeVar("T")

BULK_BYTES = 64 * 1024
# Real templates render a 64 KiB conversation in a few milliseconds (about 40 µs a message,
# docs/benchmarks.md); past this a render leaves the fast pool.
FAST_TEMPLATE_SECONDS = 0.05

fast_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")
bulk_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare-bulk")
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


class TurnsPerUser:
    """At most one of a user's requests at a time through a block; others' are not held."""

    def __init__(self) -> None:
        self._locks: dict[int, asyncio.Lock] = {}
        self._waiting: dict[int, int] = {}

    @asynccontextmanager
    async def turn(self, user_id: int) -> AsyncIterator[None]:
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        self._waiting[user_id] = self._waiting.get(user_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._waiting[user_id] -= 1
            if not self._waiting[user_id]:  # no one else queued: forget the user
                del self._waiting[user_id], self._locks[user_id]


class Counters:
    def __init__(self) -> None:
        self._ready: dict[str, TokenCounter] = {}
        self._bulk_turns = TurnsPerUser()

    def preload(self, models: tuple[ModelInfo, ...]) -> None:
        """Start loading every model's tokenizer in the background (called on catalog loads)."""
        for model in models:
            if model.name not in self._ready:
                _load_executor.submit(self._load_sync, model)

    def source(self, model: ModelInfo) -> str:
        counter = self._ready.get(model.name)
        return counter.source if counter is not None else "loading"

    async def get(self, model: ModelInfo) -> TokenCounter:
        counter = self._ready.get(model.name)
        if counter is not None:
            return counter
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_load_executor, self._load_sync, model)

    def _load_sync(self, model: ModelInfo) -> TokenCounter:
        counter = get_counter(model.name, model.tokenizer, model.korean_factor)
        self._ready[model.name] = counter
        gc.freeze()  # the tokenizer lives as long as the process: see limiter_site/asgi.py
        return counter

    async def prepare(self, size: int, user_id: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` (a request's preparation) on the fast pool, or on the bulk pool in the
        user's turn if the body is large or its template outruns the fast budget."""
        if size <= BULK_BYTES:
            try:
                return await self._on(fast_executor, FAST_TEMPLATE_SECONDS, fn, *args)
            except TemplateBudgetExceeded as exc:
                if not exc.out_of_time:
                    raise template_too_costly(exc) from None
        async with self._bulk_turns.turn(user_id):
            try:
                budget = settings.GATEWAY_TEMPLATE_BUDGET_SECONDS
                return await self._on(bulk_executor, budget, fn, *args)
            except TemplateBudgetExceeded as exc:
                raise template_too_costly(exc) from None

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the pool for a body of `size` bytes (no template involved)."""
        pool = fast_executor if size <= BULK_BYTES else bulk_executor
        return await self._on(pool, settings.GATEWAY_TEMPLATE_BUDGET_SECONDS, fn, *args)

    @staticmethod
    async def _on(pool: Executor, seconds: float, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, _budgeted, seconds, fn, *args)

    async def parse(self, body: bytes) -> dict[str, Any]:
        if len(body) <= BULK_BYTES:
            return parse_json_object(body)
        return await self.run(len(body), parse_json_object, body)

    async def count_completion(self, model: ModelInfo, text: str) -> int:
        """Generated text the upstream billed nothing for; counted like prompts."""
        counter = await self.get(model)
        return await self.run(len(text) * 3, counter.count_completion, text)
