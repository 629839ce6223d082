"""Scraping the model servers' own numbers: SGLang's `/metrics`, `/get_server_info` and
`/get_load`; vLLM's `/metrics` (its own names); for servers with neither (llama.cpp, generic
OpenAI-compatible) only `/v1/models`, which tells that the server is up and what it serves. What
each kind has is gateway/upstream_kinds.py; a model set to "auto" is detected from /v1/models.

`scrape()` reads one server and never raises: a server that does not answer gives a Sample with
ok=False and the error. `derived()` turns two stored samples into rates and interval means.
Rows are written only through `telemetry.services`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import httpx
from django.conf import settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from gateway import upstream_kinds

# Per request; a scrape runs every few seconds, so a slow server must not hold it up.
TIMEOUT_SECONDS = 2.0
METRICS_PATHS = ("/metrics",)
SERVER_INFO_PATHS = ("/get_server_info", "/server_info")  # the new name answers on newer SGLang
LOAD_PATHS = ("/get_load", "/v1/loads")
ERROR_MAX_CHARS = 300  # SGLangSample.error
MODEL_NAME_MAX_CHARS = 200  # SGLangSample.model_name

# Prometheus sample names (as they appear on the wire, `_total` kept) → Sample fields. Values
# are summed over label sets (several models, dp ranks), except RATIO_FIELDS.
METRIC_FIELDS: dict[str, str] = {
    "sglang:num_running_reqs": "running_requests",
    "sglang:num_queue_reqs": "queued_requests",
    "sglang:token_usage": "kv_cache_usage",
    "sglang:cache_hit_rate": "prefix_cache_hit_rate",
    "sglang:gen_throughput": "generation_throughput",
    "sglang:prompt_tokens_total": "prompt_tokens_total",
    "sglang:generation_tokens_total": "generation_tokens_total",
    "sglang:cached_tokens_total": "cached_tokens_total",
    "sglang:num_requests_total": "requests_total",
    "sglang:num_aborted_requests_total": "aborted_requests_total",
    "sglang:time_to_first_token_seconds_sum": "ttft_sum",
    "sglang:time_to_first_token_seconds_count": "ttft_count",
    "sglang:inter_token_latency_seconds_sum": "itl_sum",
    "sglang:inter_token_latency_seconds_count": "itl_count",
    "sglang:e2e_request_latency_seconds_sum": "e2e_sum",
    "sglang:e2e_request_latency_seconds_count": "e2e_count",
}
# vLLM's names for the same numbers (vllm `v1/metrics/loggers.py`; `gpu_cache_usage_perc` and
# `time_per_output_token_seconds` are the pre-0.9 names of the KV use and the inter-token
# latency). Prefix-cache hits count tokens, as SGLang's cached tokens do.
VLLM_METRIC_FIELDS: dict[str, str] = {
    "vllm:num_requests_running": "running_requests",
    "vllm:num_requests_waiting": "queued_requests",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:prefix_cache_hits_total": "cached_tokens_total",
    "vllm:request_success_total": "requests_total",
    "vllm:time_to_first_token_seconds_sum": "ttft_sum",
    "vllm:time_to_first_token_seconds_count": "ttft_count",
    "vllm:inter_token_latency_seconds_sum": "itl_sum",
    "vllm:inter_token_latency_seconds_count": "itl_count",
    "vllm:time_per_output_token_seconds_sum": "itl_sum",
    "vllm:time_per_output_token_seconds_count": "itl_count",
    "vllm:e2e_request_latency_seconds_sum": "e2e_sum",
    "vllm:e2e_request_latency_seconds_count": "e2e_count",
}
METRIC_NAMES = {upstream_kinds.SGLANG: METRIC_FIELDS, upstream_kinds.VLLM: VLLM_METRIC_FIELDS}
# Kinds learnt from /v1/models for models set to "auto" (per worker process).
_detected = upstream_kinds.DetectedKinds()

# Fractions (0–1) per dp rank: a sum over ranks would exceed 1, so these are averaged.
RATIO_FIELDS = frozenset({"kv_cache_usage", "prefix_cache_hit_rate"})
# Monotonic totals: a decrease between two samples means the server restarted.
COUNTER_FIELDS = (
    "prompt_tokens_total",
    "generation_tokens_total",
    "cached_tokens_total",
    "requests_total",
    "aborted_requests_total",
    "ttft_sum",
    "ttft_count",
    "itl_sum",
    "itl_count",
    "e2e_sum",
    "e2e_count",
)
# The part of /get_server_info worth keeping: the full answer holds every server argument
# (api_key included), far too much for a row every few seconds.
SERVER_INFO_KEYS = (
    "version",
    "model_path",
    "served_model_name",
    "tp_size",
    "dp_size",
    "context_length",
    "max_total_num_tokens",
    "max_running_requests",
    "max_req_input_len",
)

Scalar = str | int | float | bool | None


@dataclass
class Sample:
    """One scrape of one server; the fields are SGLangSample's, so a row is `SGLangSample(**…)`."""

    upstream_url: str
    scraped_at: datetime
    ok: bool = True
    error: str = ""
    model_name: str = ""
    running_requests: float | None = None
    queued_requests: float | None = None
    kv_cache_usage: float | None = None
    prefix_cache_hit_rate: float | None = None
    generation_throughput: float | None = None
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None
    cached_tokens_total: float | None = None
    requests_total: float | None = None
    aborted_requests_total: float | None = None
    ttft_sum: float | None = None
    ttft_count: float | None = None
    itl_sum: float | None = None
    itl_count: float | None = None
    e2e_sum: float | None = None
    e2e_count: float | None = None
    server_info: dict[str, Scalar] = field(default_factory=dict)
    load: list[dict[str, Scalar]] = field(default_factory=list)

    def as_fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ParsedMetrics:
    values: dict[str, float]  # Sample field → value; fields SGLang did not report are absent
    model_names: list[str]  # distinct `model_name` label values, in order of appearance


# --- Parsing ------------------------------------------------------------------------------------


def parse_metrics(text: str, names: dict[str, str] | None = None) -> ParsedMetrics:
    """Prometheus text → Sample field values, by `names` (SGLang's by default). Raises
    ValueError on unparseable text."""
    names = METRIC_FIELDS if names is None else names
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    model_names: list[str] = []
    for family in text_string_to_metric_families(text):
        # The parser strips `_total` from counter family names; samples keep the full name.
        for sample in family.samples:
            model = sample.labels.get("model_name")
            if model and model not in model_names:
                model_names.append(model)
            name = sample.name
            if name in names and math.isfinite(sample.value):
                series.setdefault(name, []).append((sample.labels, float(sample.value)))
    values: dict[str, float] = {}
    for name, found in series.items():
        numbers = [value for _, value in _without_priority_buckets(found)]
        target = names[name]
        value = sum(numbers) / len(numbers) if target in RATIO_FIELDS else sum(numbers)
        # Two names for one field (a renamed metric): a server reports one of them.
        values[target] = values.get(target, 0.0) + value
    return ParsedMetrics(values, model_names)


def _without_priority_buckets(
    found: list[tuple[dict[str, str], float]],
) -> list[tuple[dict[str, str], float]]:
    """With priority scheduling SGLang reports a series per priority next to an aggregate with
    `priority=""`; count the aggregate only."""
    if not any(labels.get("priority") == "" for labels, _ in found):
        return found
    return [(labels, value) for labels, value in found if not labels.get("priority")]


def pick_server_info(info: Any) -> dict[str, Scalar]:
    """The few useful fields of /get_server_info, plus last_gen_throughput summed over dp ranks."""
    if not isinstance(info, dict):
        return {}
    picked: dict[str, Scalar] = {
        key: info[key] for key in SERVER_INFO_KEYS if _is_scalar(info.get(key, ...))
    }
    states = info.get("internal_states")
    if isinstance(states, list):
        rates = [
            state["last_gen_throughput"]
            for state in states
            if isinstance(state, dict) and _is_number(state.get("last_gen_throughput"))
        ]
        if rates:
            picked["last_gen_throughput"] = float(sum(rates))
    return picked


def pick_load(load: Any) -> list[dict[str, Scalar]]:
    """Per-rank load (gateway/upstream_kinds.load_ranks), scalars only."""
    return [
        {key: value for key, value in rank.items() if _is_scalar(value)}
        for rank in upstream_kinds.load_ranks(load)
    ]


def _is_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- Fetching -----------------------------------------------------------------------------------


@dataclass
class _Fetched:
    response: httpx.Response | None = None
    error: str = ""  # "<path>: <what went wrong>" when response is None
    message: str = ""  # the same without the path


async def _fetch(client: httpx.AsyncClient, base: str, paths: Sequence[str]) -> _Fetched:
    """GET the first path that answers 2xx; the next path only after an HTTP error status."""
    result = _Fetched()
    for path in paths:
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                response = await client.get(base + path, timeout=TIMEOUT_SECONDS)
        except Exception as exc:  # refused, timed out, bad URL…: never out of a scrape
            # The server itself is unreachable, so the next path would be too.
            message = _describe(exc)
            return _Fetched(error=f"{path}: {message}", message=message)
        if response.is_success:
            return _Fetched(response=response)
        message = f"HTTP {response.status_code}"
        result = _Fetched(error=f"{path}: {message}", message=message)
    return result


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _json(fetched: _Fetched, errors: list[_Fetched]) -> Any:
    if fetched.response is None:
        errors.append(fetched)
        return None
    try:
        return fetched.response.json()
    except ValueError:
        path = fetched.response.request.url.path
        errors.append(_Fetched(error=f"{path}: not JSON", message="not JSON"))
        return None


async def scrape(url: str, client: httpx.AsyncClient, kind: str = upstream_kinds.SGLANG) -> Sample:
    """Read one server's metrics (and SGLang's server info and load) concurrently, asking only
    for what its kind has. Never raises."""
    base = url.rstrip("/")
    sample = Sample(upstream_url=base, scraped_at=timezone.now())
    known = _detected.kind(base, kind)
    models: Any = None
    if known is None:  # "auto", not detected yet: /v1/models tells
        fetched = await _fetch(client, base, (upstream_kinds.MODELS_PATH,))
        models = _json(fetched, [])
        if fetched.response is None or models is None:
            sample.ok = False
            sample.error = (fetched.error or "/v1/models: not JSON")[:ERROR_MAX_CHARS]
            return sample
        known = upstream_kinds.kind_from_models(models)
        _detected.learn(base, known)
    traits = upstream_kinds.traits(known)
    if not traits.metrics:
        return await _scrape_models_only(base, client, sample, models)
    metrics, info, load = await asyncio.gather(
        _fetch(client, base, METRICS_PATHS),
        _fetch(client, base, SERVER_INFO_PATHS) if traits.native_load else _nothing(),
        _fetch(client, base, LOAD_PATHS) if traits.native_load else _nothing(),
    )
    errors: list[_Fetched] = []
    parsed = ParsedMetrics({}, [])
    if metrics.response is None:
        errors.append(metrics)
    else:
        try:
            parsed = parse_metrics(metrics.response.text, METRIC_NAMES[traits.metrics])
        except Exception as exc:  # the parser raises ValueError, and sometimes others
            message = f"unparseable: {_describe(exc)}"
            errors.append(_Fetched(error=f"/metrics: {message}", message=message))
    if traits.native_load:
        sample.server_info = pick_server_info(_json(info, errors))
        sample.load = pick_load(_json(load, errors))
    for name, value in parsed.values.items():
        setattr(sample, name, value)
    served = sample.server_info.get("served_model_name")
    names = parsed.model_names or ([served] if isinstance(served, str) and served else [])
    sample.model_name = ", ".join(names)[:MODEL_NAME_MAX_CHARS]
    # Reachable when anything answered; what did not is still told in `error`.
    sample.ok = any(f.response is not None for f in (metrics, info, load))
    sample.error = _join_errors(errors)
    return sample


async def _nothing() -> _Fetched:
    return _Fetched()


async def _scrape_models_only(
    base: str, client: httpx.AsyncClient, sample: Sample, models: Any = None
) -> Sample:
    """A server without metrics: up or down, and the models it serves (`models`: /v1/models'
    answer when detection has just read it)."""
    errors: list[_Fetched] = []
    if models is None:
        fetched = await _fetch(client, base, (upstream_kinds.MODELS_PATH,))
        models = _json(fetched, errors)
        sample.ok = fetched.response is not None
    sample.model_name = ", ".join(upstream_kinds.model_ids(models))[:MODEL_NAME_MAX_CHARS]
    sample.error = _join_errors(errors)
    return sample


def _join_errors(errors: list[_Fetched]) -> str:
    messages = {e.message for e in errors}
    if len(errors) > 1 and len(messages) == 1:  # e.g. every route refused: say it once
        text = messages.pop()
    else:
        text = "; ".join(e.error for e in errors)
    return text[:ERROR_MAX_CHARS]


async def scrape_all(targets: Iterable[str] | Mapping[str, str]) -> list[Sample]:
    """Scrape every server concurrently with one client; `targets`: URLs (SGLang) or
    {URL: kind}."""
    kinds = dict(targets) if isinstance(targets, Mapping) else dict.fromkeys(targets, "sglang")
    async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS, trust_env=False) as client:
        return list(
            await asyncio.gather(*(scrape(url, client, kind) for url, kind in kinds.items()))
        )


def upstream_urls() -> list[str]:
    """Every distinct upstream of the active served models; SGLANG_URL when there are none."""
    return list(upstream_targets())


def upstream_targets() -> dict[str, str]:
    """{upstream URL: configured kind} of the active served models; SGLANG_URL ("auto") when
    there are none."""
    from gateway.caches import stored_models

    default = settings.SGLANG_URL.rstrip("/")
    models = stored_models(default)
    return upstream_kinds.upstreams(models) or {default: upstream_kinds.AUTO}


# --- Rates between two samples -------------------------------------------------------------------


class Totals(Protocol):
    """What `derived` reads: an SGLangSample row or a Sample."""

    scraped_at: datetime
    prompt_tokens_total: float | None
    generation_tokens_total: float | None
    cached_tokens_total: float | None
    requests_total: float | None
    aborted_requests_total: float | None
    ttft_sum: float | None
    ttft_count: float | None
    itl_sum: float | None
    itl_count: float | None
    e2e_sum: float | None
    e2e_count: float | None


def derived(prev: Totals, cur: Totals) -> dict[str, Any]:
    """Rates and means over the interval between two samples of the same server.

    If any total went down the server restarted in between (its counters began again at 0), so
    the increase is the later value itself. Anything that cannot be known is None: a side
    missing a total, no requests in the interval for a mean, a non-positive interval for a rate.
    """
    seconds = (cur.scraped_at - prev.scraped_at).total_seconds()
    pairs = {name: (getattr(prev, name), getattr(cur, name)) for name in COUNTER_FIELDS}
    reset = any(a is not None and b is not None and b < a for a, b in pairs.values())
    delta: dict[str, float | None] = {
        name: None if a is None or b is None else (b if reset else b - a)
        for name, (a, b) in pairs.items()
    }

    def rate(name: str) -> float | None:
        value = delta[name]
        return None if value is None or seconds <= 0 else value / seconds

    def ratio(top: str, bottom: str) -> float | None:
        above, below = delta[top], delta[bottom]
        return None if above is None or not below else above / below

    return {
        "seconds": seconds,
        "reset": reset,
        "requests_per_second": rate("requests_total"),
        "aborted_per_second": rate("aborted_requests_total"),
        "prompt_tokens_per_second": rate("prompt_tokens_total"),
        "generation_tokens_per_second": rate("generation_tokens_total"),
        "prefix_cache_hit_rate": ratio("cached_tokens_total", "prompt_tokens_total"),
        "ttft_mean_seconds": ratio("ttft_sum", "ttft_count"),
        "itl_mean_seconds": ratio("itl_sum", "itl_count"),
        "e2e_mean_seconds": ratio("e2e_sum", "e2e_count"),
    }
