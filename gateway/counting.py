"""Counting a request's prompt with the served model's tokenizer, without stalling the loop.

Tokenizers load once per process, on a worker thread. Short prompts (the common case, tens of
microseconds) are counted inline; a long one is counted on a thread so that one 30,000-character
prompt never holds up the other requests on this event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway.caches import ModelInfo
from quotas.tokens import TokenCounter, get_counter

log = logging.getLogger(__name__)

# Above this many body bytes the prompt is counted off the event loop.
INLINE_COUNT_MAX_BYTES = 8 * 1024

token_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="token-count")


class Counters:
    def __init__(self) -> None:
        self._ready: dict[str, TokenCounter] = {}
        self._loading: dict[str, asyncio.Future[TokenCounter]] = {}

    def preload(self, models: tuple[ModelInfo, ...]) -> None:
        """Start loading every model's tokenizer in the background (called on catalog loads)."""
        for model in models:
            if model.name not in self._ready:
                token_executor.submit(self._load_sync, model)

    def source(self, model: ModelInfo) -> str:
        counter = self._ready.get(model.name)
        return counter.source if counter is not None else "loading"

    async def get(self, model: ModelInfo) -> TokenCounter:
        counter = self._ready.get(model.name)
        if counter is not None:
            return counter
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(token_executor, self._load_sync, model)

    def _load_sync(self, model: ModelInfo) -> TokenCounter:
        counter = get_counter(model.name, model.tokenizer, model.korean_factor)
        self._ready[model.name] = counter
        gc.freeze()  # the tokenizer lives as long as the process: see limiter_site/asgi.py
        return counter

    async def count_prompt(
        self, model: ModelInfo, endpoint: str, body: dict[str, Any], size: int
    ) -> int:
        counter = await self.get(model)
        if size <= INLINE_COUNT_MAX_BYTES:
            return _count(counter, endpoint, body)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(token_executor, _count, counter, endpoint, body)

    async def count_completion(self, model: ModelInfo, text: str) -> int:
        """Generated text the upstream billed nothing for; long text off the loop, as prompts."""
        counter = await self.get(model)
        if len(text) * 3 <= INLINE_COUNT_MAX_BYTES:  # Hangul is 3 bytes in the UTF-8 body
            return counter.count_completion(text)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(token_executor, counter.count_completion, text)


def _count(counter: TokenCounter, endpoint: str, body: dict[str, Any]) -> int:
    try:
        if endpoint == "chat/completions":
            kwargs = body.get("chat_template_kwargs")
            return counter.count_chat(
                body["messages"],
                body.get("tools"),
                tool_choice=body.get("tool_choice"),
                **(kwargs if isinstance(kwargs, dict) else {}),
            )
        return _count_prompt_field(counter, body["prompt"])
    except Exception:
        # A template that cannot render this conversation will fail upstream too; the
        # upstream's own usage then decides what is billed.
        log.warning("could not count the prompt with %s", counter.source, exc_info=True)
        return 0


def _count_prompt_field(counter: TokenCounter, prompt: Any) -> int:
    if isinstance(prompt, str):
        return counter.count_text(prompt)
    if prompt and all(isinstance(p, int) for p in prompt):
        return len(prompt)  # already token ids
    return sum(counter.count_text(p) if isinstance(p, str) else len(p) for p in prompt)
