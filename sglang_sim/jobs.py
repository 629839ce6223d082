"""The SGLang simulator's shared data: its configuration, a request in flight, its counters.

`sglang_sim.server` runs the engine; `sglang_sim.wire` and `sglang_sim.metrics` only read it. They
read it through `EngineState`, a protocol declared here that `server.Simulator` satisfies, so the
imports go one way (server → wire, metrics → jobs) and this module imports nothing of the package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"


KINDS = ("sglang", "openai-generic")


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
