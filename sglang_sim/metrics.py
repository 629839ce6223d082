"""The SGLang simulator's Prometheus metrics, under SGLang's own metric names.

They read the engine through `sglang_sim.jobs.EngineState`, never `sglang_sim.server` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sglang_sim.jobs import EngineState

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60)
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.06, 0.08, 0.1)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 150, 200, 300)
QUEUE_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60)


class SimMetrics:
    """SGLang's Prometheus metric names, in a registry of the simulator's own."""

    def __init__(self, sim: EngineState) -> None:
        self.registry = registry = CollectorRegistry()
        model, labels = sim.config.model, ["model_name"]

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, labels, registry=registry).labels(model)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry).labels(model)

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, labels, registry=registry).labels(model).set_function(read)

        self.prompt_tokens = counter("sglang:prompt_tokens", "Prefill tokens processed")
        self.generation_tokens = counter("sglang:generation_tokens", "Tokens generated")
        self.cached_tokens = counter("sglang:cached_tokens", "Prompt tokens from prefix cache")
        self.requests = counter("sglang:num_requests", "Requests finished (aborts included)")
        self.aborted = counter("sglang:num_aborted_requests", "Requests aborted")
        self.ttft = histogram("sglang:time_to_first_token_seconds", "TTFT", TTFT_BUCKETS)
        self.itl = histogram("sglang:inter_token_latency_seconds", "Between tokens", ITL_BUCKETS)
        self.e2e = histogram("sglang:e2e_request_latency_seconds", "Whole request", E2E_BUCKETS)
        self.queue_time = histogram("sglang:queue_time_seconds", "Waiting to run", QUEUE_BUCKETS)
        gauge("sglang:num_running_reqs", "Requests generating", lambda: len(sim.running))
        gauge("sglang:num_queue_reqs", "Requests waiting", lambda: sim.waiting)
        gauge("sglang:num_used_tokens", "KV tokens in use", sim.used_tokens)
        gauge("sglang:token_usage", "KV pool use, 0-1", sim.token_usage)
        gauge("sglang:max_total_num_tokens", "KV pool size", lambda: sim.config.max_total_tokens)
        gauge("sglang:gen_throughput", "Tokens per second", sim.throughput.rate)
        gauge("sglang:cache_hit_rate", "Prefix cache hit rate", sim.cache_hit_rate)
        gauge("sglang:num_retracted_reqs", "Retracted requests (never here)", lambda: 0)
        gauge("sglang:utilization", "Share of the KV pool in use", sim.token_usage)
