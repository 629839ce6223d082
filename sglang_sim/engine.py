"""The GPU-like engine (`--engine gpu`): continuous batching as SGLang's scheduler does it.

The fixed-speed engine (`--engine fixed`, the default, for fast tests) runs each request at its
own pace however many run. A GPU does not: one forward pass ("step") decodes one token for
every running request at once, and a step takes longer the larger the batch. This engine
models that, so that contention between users can be seen and measured (bench/fairness_bench):

- **Decode**: each step gives every running request one token and lasts
  `step_base_ms + step_per_request_ms × running` (a memory-bandwidth-bound decode: the weights
  are read once per step whatever the batch, and each request adds its KV reads).
- **Prefill**: a newly admitted request's uncached prompt tokens are processed in the step that
  admits it, adding `prefill_ms_per_token` each, at most `chunked_prefill_size` tokens a step
  (more waits for the next step, as SGLang's chunked prefill does); its first token comes out
  of that step.
- **KV budget**: a request is admitted only if its prompt and its whole answer fit in what the
  running requests leave of `max_total_tokens` (no retraction: the budget is reserved up
  front), and at most `max_running_requests` run (0: no limit but the budget). The others wait
  in the queue, served first come first served, or by `priority` with
  `--enable-priority-scheduling` (larger values first, as SGLang's default; lower first with
  `--schedule-low-priority-values-first`).
- **Prefix cache** (radix-style): prompts are cached by blocks of `CACHE_BLOCK` token ids; a
  new prompt's longest cached block prefix is not prefilled again and is reported as
  `cached_tokens`. The cache holds at most `max_total_tokens` tokens, least recently used out.
- `--max-queued-requests`: past it, a request is refused at once with 503, as SGLang does.

Defaults (SimulatorConfig): a 7–8B model in BF16 on one A100-class GPU. A decode step at batch
1 reads the ~15 GB of weights at ~2 TB/s: about 7.5 ms (SGLang's Llama-3-8B A100 results, LMSYS
blog 2024-07-25, report inter-token latencies of this order at low load); each request in the
batch adds its KV-cache reads, ~0.12 ms at the prompt lengths of a chat service, so 64 running
requests take ~15 ms a step (~4,300 tokens/s in all). Prefill runs at ~12,000 tokens/s
(0.08 ms a token), compute-bound. They are figures of that order, not a measurement of any
GPU: `--step-base-ms`, `--step-per-request-ms` and `--prefill-ms-per-token` set them.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from sglang_sim.jobs import Job, SimulatorConfig
from sglang_sim.wire import SimError

CACHE_BLOCK = 16  # tokens a prefix-cache entry covers (SGLang's radix tree is per token)


class PrefixCache:
    """Prompt prefixes by blocks of token ids, least recently used evicted past `capacity`."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_blocks = max(capacity_tokens // CACHE_BLOCK, 1)
        self.blocks: collections.OrderedDict[int, None] = collections.OrderedDict()

    @staticmethod
    def _keys(ids: Sequence[int]) -> list[int]:
        """One key per whole block: the hash of the prefix up to the block's end."""
        keys, chained = [], 0
        for start in range(0, len(ids) - CACHE_BLOCK + 1, CACHE_BLOCK):
            chained = hash((chained, tuple(ids[start : start + CACHE_BLOCK])))
            keys.append(chained)
        return keys

    def match_and_insert(self, ids: Sequence[int]) -> int:
        """Tokens of `ids` already cached (a whole-block prefix); then caches all of `ids`."""
        keys = self._keys(ids)
        cached = 0
        for key in keys:
            if key not in self.blocks:
                break
            cached += CACHE_BLOCK
        for key in keys:
            self.blocks[key] = None
            self.blocks.move_to_end(key)
        while len(self.blocks) > self.capacity_blocks:
            self.blocks.popitem(last=False)
        # The last token is always computed: SGLang never serves a whole prompt from cache.
        return min(cached, max(len(ids) - 1, 0))


class BatchEngine:
    """The scheduler loop and the queue; `Simulator` hands its requests to it."""

    def __init__(self, config: SimulatorConfig, on_prefilled: Callable[[Job], None]) -> None:
        self.config = config
        self.on_prefilled = on_prefilled
        self.running: list[Job] = []
        self.queue: list[Job] = []
        self.cache = PrefixCache(config.max_total_tokens) if config.radix_cache else None
        self._arrivals = itertools.count()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.steps = 0

    # --- what the metrics read ---

    def reserved_tokens(self) -> int:
        return sum(job.prompt_tokens + job.target for job in self.running)

    def used_tokens(self) -> int:
        return sum(job.prompt_tokens + job.generated for job in self.running)

    # --- a request's life ---

    @asynccontextmanager
    async def admitted(self, job: Job) -> AsyncIterator[Job]:
        limit = self.config.max_queued_requests
        if limit and len(self.queue) >= limit:
            raise SimError("The request queue is full.", 503)
        if job.prompt_tokens + job.target > self.config.max_total_tokens:
            raise SimError(
                f"The request needs {job.prompt_tokens + job.target} KV tokens, more than "
                f"the pool's {self.config.max_total_tokens}."
            )
        job.arrival = next(self._arrivals)
        self.queue.append(job)
        self._ensure_loop()
        self._wake.set()
        try:
            while not job.scheduled:
                await job.progress.wait()
                job.progress.clear()
            yield job
        finally:
            # Cancelled (the client left) or done: out of the queue or the batch, KV released.
            if job in self.queue:
                self.queue.remove(job)
            if job in self.running:
                self.running.remove(job)
            self._wake.set()

    async def tokens(self, job: Job) -> AsyncIterator[int]:
        """Yields how many new tokens each step gave `job` (once prefilled), until its target."""
        seen = 0
        while seen < job.target:
            while job.produced == seen:
                await job.progress.wait()
                job.progress.clear()
            new, seen = job.produced - seen, job.produced
            yield new

    # --- the scheduler ---

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _order(self) -> list[Job]:
        if not self.config.priority_scheduling:
            return sorted(self.queue, key=lambda j: j.arrival)
        sign = 1 if self.config.low_priority_values_first else -1
        return sorted(self.queue, key=lambda j: (sign * j.priority, j.arrival))

    def _admit(self) -> list[Job]:
        cap = self.config.max_running_requests
        room = self.config.max_total_tokens - self.reserved_tokens()
        admitted = []
        for job in self._order():
            if cap and len(self.running) >= cap:
                break
            need = job.prompt_tokens + job.target
            if need > room:
                break  # first come first served: nobody overtakes the head of the queue
            room -= need
            self.queue.remove(job)
            self.running.append(job)
            job.scheduled = True
            if self.cache is not None and job.prompt_ids:
                job.cached_tokens = max(job.cached_tokens,
                                        self.cache.match_and_insert(job.prompt_ids))  # fmt: skip
            job.prefill_left = job.prompt_tokens - job.cached_tokens
            job.progress.set()
            admitted.append(job)
        return admitted

    async def _run(self) -> None:
        config = self.config
        while True:
            if not self.running and not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._admit()
            budget = config.chunked_prefill_size
            prefill = 0
            for job in self.running:
                if job.prefill_left and budget:
                    chunk = min(job.prefill_left, budget)
                    job.prefill_left -= chunk
                    budget -= chunk
                    prefill += chunk
            # A finished request leaves the batch when its handler has sent the last token.
            decoding = [j for j in self.running if not j.prefill_left and j.produced < j.target]
            step_ms = (
                config.step_base_ms
                + config.step_per_request_ms * len(decoding)
                + config.prefill_ms_per_token * prefill
            )
            await asyncio.sleep(step_ms / 1000)
            self.steps += 1
            for job in decoding:
                if not job.prefilled:
                    job.prefilled = True
                    self.on_prefilled(job)
                job.produced += 1
                job.progress.set()
