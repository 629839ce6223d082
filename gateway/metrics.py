"""The gateway's own Prometheus metrics, served at `GET /metrics`.

Several gateway processes on one host (uvicorn/daphne workers) are summed when
PROMETHEUS_MULTIPROC_DIR is set (prometheus_client's multiprocess mode: each process writes
its values to files there; the directory must exist and be emptied at deploy). No per-user
label unless GATEWAY_METRICS_PER_USER is on: users are unbounded, series must not be.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from typing import Any

from django.conf import settings
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
USER = ("user",) if settings.GATEWAY_METRICS_PER_USER else ()

REQUESTS = Counter(
    "gateway_requests_total", "Requests by model and HTTP status.", ["model", "status", *USER]
)
TOKENS = Counter(
    "gateway_tokens_total", "Tokens billed, by model and direction (prompt|completion).",
    ["model", "direction", *USER],
)  # fmt: skip
RATE_LIMITED = Counter("gateway_rate_limited_total", "429 answers by limit kind.", ["kind", *USER])
LIMITER_SECONDS = Histogram(
    "gateway_limiter_decision_seconds", "Time to admit a request (one limiter round trip).",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
UPSTREAM_SECONDS = Histogram(
    "gateway_upstream_latency_seconds", "Time until the upstream's response headers.",
    ["model"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
TTFT_SECONDS = Histogram(
    "gateway_time_to_first_token_seconds", "Time until the first streamed event.",
    ["model"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
QUEUE_SECONDS = Histogram(
    "gateway_queue_wait_seconds", "Time waited for a place on a full model server (fair queue).",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
UPSTREAM_EJECTIONS = Counter(
    "gateway_upstream_ejections_total",
    "Times a model server was left out of routing (refused a connection or failed its load "
    "readings; gateway/routing.py).",
    ["upstream"],
)  # fmt: skip
UPSTREAM_RETRIES = Counter(
    "gateway_upstream_retries_total",
    "Requests sent to another server after one refused the connection.", ["model"],
)  # fmt: skip
IN_FLIGHT = Gauge(
    "gateway_requests_in_flight", "Requests being proxied now.", multiprocess_mode="livesum"
)
LEDGER_BACKLOG = Gauge(
    "gateway_ledger_backlog", "Usage events queued in gateway processes, not yet shipped.",
    multiprocess_mode="livesum",
)  # fmt: skip
LEDGER_STREAM_BACKLOG = Gauge(
    "gateway_ledger_stream_backlog",
    "Usage events in the Redis ledger stream, not yet written to the database by Celery.",
    multiprocess_mode="mostrecent",
)
LEDGER_OLDEST_PENDING = Gauge(
    "gateway_ledger_oldest_pending_seconds",
    "Age of the oldest usage event not yet in the database (this gateway's spool or the stream).",
    multiprocess_mode="max",
)
LEDGER_DEAD_LETTERS = Gauge(
    "gateway_ledger_dead_letters",
    "Usage events the ledger could not write, waiting in the dead-letter table for a replay.",
    multiprocess_mode="mostrecent",
)

# Readiness, as gauges an alert rule can watch (set at every scrape from /health/ready's report).
READY = Gauge(
    "gateway_ready", "1 when this gateway serves (readiness ok or degraded), else 0.",
    multiprocess_mode="mostrecent",
)  # fmt: skip
UPSTREAM_UP = Gauge(
    "gateway_upstream_up", "1 when the upstream answers its health probe, else 0.",
    ["upstream"], multiprocess_mode="mostrecent",
)  # fmt: skip
DATABASE_UP = Gauge(
    "gateway_database_up", "1 when the database answers, else 0.", multiprocess_mode="mostrecent"
)
REDIS_UP = Gauge(
    "gateway_redis_up", "1 when Redis answers (and keeps what the ledger needs), else 0.",
    multiprocess_mode="mostrecent",
)  # fmt: skip
QUOTA_ALERT_FAILURES = Gauge(
    "gateway_quota_alert_failures",
    "Quota alert deliveries (e-mail, webhook) that failed in the last hour.",
    multiprocess_mode="mostrecent",
)


def exposition() -> tuple[bytes, str]:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    for attempt in range(3):
        try:
            return generate_latest(registry), CONTENT_TYPE_LATEST
        except struct.error:
            # Another process has just created its metrics file and not yet sized it.
            if attempt == 2:
                raise
            time.sleep(0.01)
    raise AssertionError("unreachable")


def user_labels(username: str) -> tuple[str, ...]:
    return (username,) if USER else ()


@functools.lru_cache(maxsize=4096)
def series(metric: Any, *labels: str) -> Any:
    """metric.labels(*labels), looked up once: prometheus_client's own lookup was about 3 % of
    the gateway's CPU under load (py-spy)."""
    return metric.labels(*labels)


def observe_finished(
    model: str, username: str, status: int, prompt: int, completion: int,
    upstream_ms: float | None, ttft_ms: float | None,
) -> None:  # fmt: skip
    user = user_labels(username)
    series(REQUESTS, model, str(status), *user).inc()
    if prompt:
        series(TOKENS, model, "prompt", *user).inc(prompt)
    if completion:
        series(TOKENS, model, "completion", *user).inc(completion)
    if upstream_ms is not None:
        series(UPSTREAM_SECONDS, model).observe(upstream_ms / 1000)
    if ttft_ms is not None:
        series(TTFT_SECONDS, model).observe(ttft_ms / 1000)


def observe_refused(username: str, status: int, kind: str) -> None:
    user = user_labels(username)
    series(REQUESTS, "", str(status), *user).inc()
    if status == 429:
        series(RATE_LIMITED, kind, *user).inc()


def observe_readiness(report: dict[str, Any]) -> None:
    """The readiness report (gateway/health.py) as gauges, for alert rules."""
    READY.set(1 if report["status"] in ("ok", "degraded") else 0)
    for upstream in report["upstreams"]:
        series(UPSTREAM_UP, upstream["url"]).set(1 if upstream["ok"] else 0)
    database = report["database"]
    DATABASE_UP.set(1 if database.get("ok") else 0)
    if database.get("quota_alert_failures") is not None:
        QUOTA_ALERT_FAILURES.set(database["quota_alert_failures"])
    redis = report["redis"]
    if redis.get("ok") is not None:  # None: no Redis configured
        REDIS_UP.set(1 if redis["ok"] and not redis.get("persistence_problem") else 0)
