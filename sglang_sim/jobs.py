"""The SGLang simulator's shared data: its configuration, a request in flight, its counters.

`sglang_sim.server` runs the engine; `sglang_sim.wire` and `sglang_sim.metrics` only read it. They
read it through `EngineState`, a protocol declared here that `server.Simulator` satisfies, so the
imports go one way (server → wire, metrics → jobs) and this module imports nothing of the package.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"


KINDS = ("sglang", "openai-generic")
ENGINES = ("fixed", "gpu")


@dataclass(frozen=True)
class SimulatorConfig:
    model: str = DEFAULT_MODEL
    tokens_per_second: float = 100.0  # 0 = as fast as possible
    ttft_ms: float = 50.0
    tokenizer: str = ""
    context_length: int = 32768
    max_total_tokens: int = 262144
    max_running_requests: int = 0  # 0 = no limit, nothing ever queues
    answer_tokens: int = 64
    # "sglang": SGLang's whole API. "openai-generic": what a plain OpenAI-compatible server
    # (llama-cpp-python, for one) has: /v1/* only, no /health, no /metrics, no usage in streams.
    kind: str = "sglang"
    # A chat template (text) the simulated model uses instead of its tokenizer's: a server
    # started with another template than the gateway counts with (--chat-template).
    chat_template: str = ""
    # "fixed": each request at tokens_per_second however many run (fast tests). "gpu":
    # continuous batching with a step time growing with the batch (sglang_sim/engine.py, which
    # explains the defaults below).
    engine: str = "fixed"
    step_base_ms: float = 7.5
    step_per_request_ms: float = 0.12
    prefill_ms_per_token: float = 0.08
    chunked_prefill_size: int = 8192
    radix_cache: bool = True
    priority_scheduling: bool = False  # SGLang's --enable-priority-scheduling
    low_priority_values_first: bool = False  # --schedule-low-priority-values-first
    max_queued_requests: int = 0  # 0: no limit


@dataclass
class Job:
    """One validated generation request and its progress."""

    rid: str
    model: str  # echoed back as the client sent it, as SGLang does
    prompt_tokens: int
    target: int
    natural_stop: bool
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    cached_tokens: int = 0
    generated: int = 0
    finish_reason: str = ""
    abort_requested: bool = False
    started: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    # The GPU-like engine's bookkeeping (sglang_sim/engine.py).
    priority: int = 0
    prompt_ids: tuple[int, ...] = ()
    arrival: int = 0
    scheduled: bool = False
    prefill_left: int = 0
    prefilled: bool = False
    produced: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class SimStats:
    """What GET /sim/stats reports since the start or the last POST /sim/reset."""

    requests: int = 0
    aborted: int = 0
    abort_requests: int = 0  # POST /abort_request calls (the explicit route, by rid)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    peak_running: int = 0


class ThroughputMeter:
    """Tokens per second over the last full interval, like SGLang's last_gen_throughput."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.tokens = 0
        self.mark = (time.monotonic(), 0)
        self.last_rate = 0.0

    def rate(self) -> float:
        now = time.monotonic()
        since, tokens_then = self.mark
        if now - since >= self.interval:
            self.last_rate = (self.tokens - tokens_then) / (now - since)
            self.mark = (now, self.tokens)
        return self.last_rate


class EngineState(Protocol):
    """What the wire format and the metrics read from the running engine (`server.Simulator`)."""

    config: SimulatorConfig
    running: dict[int, Job]
    waiting: int
    throughput: ThroughputMeter

    def used_tokens(self) -> int: ...

    def token_usage(self) -> float: ...

    def cache_hit_rate(self) -> float: ...

    def matched_stop(self, job: Job) -> int | None: ...
