"""Health: an anonymous liveness answer, and a readiness report for operators.

`GET|HEAD /health` says only that this process answers: no database, no Redis, no upstream, no
version, nothing a stranger could use, and nothing that costs (load balancers call it often).
`GET /health/ready` checks the database, Redis (and that it keeps the append-only file the
ledger's stream needs), every upstream and the ledger (how long the oldest usage event has
waited to reach the database, whether a worker drains the stream, dead letters), and says why
not ready. It is for staff sessions and monitoring (gateway/monitoring.py), computed at most
once a second whoever asks, over pooled connections: its own Redis client and its own database
thread, so a hung database never takes the threads that look up API keys.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import aiohttp
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from gateway import upstream_kinds
from gateway.caches import ModelCatalog, ModelInfo
from gateway.ledger import LedgerWriter
from gateway.upstream import Upstream
from gateway.upstream_kinds import DetectedKinds, traits
from quotas import ledger_stream
from quotas.models import DeliveryStatus, LedgerDeadLetter, QuotaAlertDelivery

CHECK_TIMEOUT = 2.0
REPORT_TTL = 1.0
LEDGER_BACKLOG_WARNING = 10_000
LIVE = {"status": "ok"}

_health_db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-db")


@dataclass
class Readiness:
    catalog: ModelCatalog
    upstream: Upstream
    ledger: LedgerWriter
    in_flight: Callable[[], int]
    token_counter: Callable[[ModelInfo], str]
    kinds: DetectedKinds = field(default_factory=DetectedKinds)
    # The latest tokenizer self-check per model name (gateway/self_check.py), as shown here.
    self_check: Callable[[str], dict[str, Any] | None] = lambda name: None
    counter_problem: Callable[[ModelInfo], str] = lambda model: ""

    def __post_init__(self) -> None:
        self._report: dict[str, Any] | None = None
        self._expires = 0.0
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._redis: Any = None
        self._redis_loop: asyncio.AbstractEventLoop | None = None

    async def report(self) -> dict[str, Any]:
        """The last report if under a second old, else one new one shared by every caller."""
        if self._report is not None and time.monotonic() < self._expires:
            return self._report
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._build())
        report = await asyncio.shield(self._pending)
        self._report, self._expires = report, time.monotonic() + REPORT_TTL
        return report

    async def _build(self) -> dict[str, Any]:
        database, redis_state = await asyncio.gather(_timed(_ping_database), self.redis_state())
        try:
            models = await asyncio.wait_for(self.catalog.models(), CHECK_TIMEOUT)
        except Exception:
            models = self.catalog.snapshot()
        targets = upstream_kinds.upstreams(models) or {settings.SGLANG_URL: upstream_kinds.AUTO}
        upstreams = await asyncio.gather(
            *(self.probe_upstream(url, targets[url]) for url in sorted(targets))
        )
        ledger = self._ledger(database, redis_state)
        # One model's GPU being down must not pull the whole gateway out of a load balancer: it
        # serves while its own dependencies are up and at least one upstream answers. A Redis
        # that would lose the ledger's stream on restart is not a dependency that is up.
        serving = (
            database["ok"]
            and redis_state["ok"] is not False
            and not redis_state.get("persistence_problem")
            and any(u["ok"] for u in upstreams)
        )
        listed = [self._model_entry(m) for m in models]
        count_problems = _count_problems(listed)
        if not serving:
            status = "unavailable"
        elif any(m["token_counter"] == "loading" for m in listed):
            # Tokenizers load at start-up (seconds for a large one): a load balancer should
            # not send the first requests to wait for them.
            status = "starting"
        elif all(u["ok"] for u in upstreams) and models and not count_problems:
            status = "ok"
        else:
            status = "degraded"
        return {
            "status": status,
            "gateway": {"in_flight": self.in_flight()},
            "ledger": ledger,
            "upstreams": upstreams,
            # The ping's count is reported once, under "ledger".
            "database": {"vendor": connection.vendor}
            | {k: v for k, v in database.items() if k != "dead_letters"},
            "redis": redis_state,
            "models": listed,
            "warnings": self._warnings(ledger, redis_state, models) + count_problems,
        }

    def _model_entry(self, model: ModelInfo) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": model.name,
            "aliases": list(model.aliases),
            "upstream_kind": self.kinds.kind(model.upstream_url, model.upstream_kind)
            or model.upstream_kind,
            "token_counter": self.token_counter(model),
            "prompt_token_offset": model.prompt_token_offset,
        }
        problem = self.counter_problem(model)
        if problem:
            entry["token_counter_problem"] = problem
        check = self.self_check(model.name)
        if check is not None:
            entry["self_check"] = check
        return entry

    def _ledger(self, database: dict[str, Any], redis_state: dict[str, Any]) -> dict[str, Any]:
        """Where usage events are on their way to the database, and how long the oldest waits."""
        spool_age = self.ledger.oldest_pending_age()
        stream_age = redis_state.get("oldest_entry_seconds", 0.0)
        return {
            "pending": self.ledger.pending,
            "dropped": self.ledger.dropped,
            "stream_backlog": redis_state.get("ledger_stream_backlog"),
            "oldest_pending_seconds": round(max(spool_age, stream_age), 3),
            "last_drain_seconds_ago": redis_state.get("last_drain_seconds_ago"),
            "dead_letters": database.get("dead_letters"),
        }

    def _warnings(
        self, ledger: dict[str, Any], redis_state: dict[str, Any], models: tuple[ModelInfo, ...]
    ) -> list[str]:
        warnings = []
        limit = settings.LEDGER_PENDING_WARNING_SECONDS
        if ledger["oldest_pending_seconds"] > limit:
            warnings.append(
                f"the oldest usage event has waited {ledger['oldest_pending_seconds']:.0f} s "
                "to reach the database: are Celery workers (`celery -A limiter_site worker`) "
                "and the database up?"
            )
        backlog = ledger["stream_backlog"] or 0
        last_drain = ledger["last_drain_seconds_ago"]
        if backlog and (last_drain is None or last_drain > limit):
            warnings.append(
                f"{backlog} usage events wait in the ledger stream and no worker has drained it "
                + ("yet" if last_drain is None else f"for {last_drain:.0f} s")
            )
        elif backlog > LEDGER_BACKLOG_WARNING:
            warnings.append(f"{backlog} usage events wait in the ledger stream")
        if self.ledger.pending > LEDGER_BACKLOG_WARNING:
            warnings.append(f"{self.ledger.pending} usage events wait in this gateway's spool")
        if ledger["dead_letters"]:
            warnings.append(
                f"{ledger['dead_letters']} usage events could not be written: see the ledger's "
                "dead letters in the admin, fix the cause, replay them"
            )
        if redis_state.get("persistence_problem"):
            warnings.append(redis_state["persistence_problem"])
        if not models:
            warnings.append(
                "no served models configured: run `manage.py import_config config/*.yaml`"
            )
        return warnings

    async def redis_state(self) -> dict[str, Any]:
        if not settings.REDIS_URL:
            return {"ok": None, "mode": "embedded (REDIS_URL not set)"}
        client = self._redis_client()

        async def ledger_stream_state() -> dict[str, Any]:
            # Usage events appended by gateways and not yet written by a Celery worker.
            pipe = client.pipeline(transaction=False)
            pipe.xlen(settings.LEDGER_STREAM)
            pipe.xrange(settings.LEDGER_STREAM, count=1)
            pipe.get(ledger_stream.drained_key())
            backlog, first, drained_at = await pipe.execute()
            now = time.time()
            state: dict[str, Any] = {
                "ledger_stream_backlog": int(backlog),
                "oldest_entry_seconds": ledger_stream.oldest_age(
                    first[0][0] if first else None, now
                ),
                "last_drain_seconds_ago": round(now - float(drained_at), 3) if drained_at else None,
            }
            problem = await self._persistence_problem(client)
            if problem:
                state["persistence_problem"] = problem
            return state

        return await _timed(ledger_stream_state)

    async def _persistence_problem(self, client: Any) -> str | None:
        if settings.LEDGER_REDIS_PERSISTENCE == "trust":
            return None
        import redis

        try:
            config = await client.config_get("appendonly")
        except redis.ResponseError as exc:  # CONFIG renamed or disabled (managed Redis)
            return ledger_stream.unverifiable(exc)
        return ledger_stream.persistence_problem(config)

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is not None and self._redis_loop is asyncio.get_running_loop():
            await client.aclose()

    def _redis_client(self) -> Any:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        loop = asyncio.get_running_loop()
        if self._redis is None or self._redis_loop is not loop:
            # One small pool for this process's health checks, reused: not a connection a call.
            self._redis = aioredis.Redis.from_url(
                settings.REDIS_URL,
                socket_timeout=CHECK_TIMEOUT,
                socket_connect_timeout=CHECK_TIMEOUT,
                max_connections=2,
                retry=Retry(NoBackoff(), 0),  # a check reports what it sees; it does not retry
            )
            self._redis_loop = loop
        return self._redis

    async def probe_upstream(self, url: str, configured: str) -> dict[str, Any]:
        """Probe what this kind of server has (gateway/upstream_kinds.py): SGLang's and vLLM's
        /health, else /v1/models, which also tells an "auto" model's kind."""
        kind = self.kinds.kind(url, configured)

        async def get() -> dict[str, Any]:
            path = upstream_kinds.MODELS_PATH if kind is None else traits(kind).liveness_path
            timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT)
            async with self.upstream.session().get(f"{url}{path}", timeout=timeout) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status} from {path}")
                if kind is not None:
                    return {"kind": kind}
                detected = upstream_kinds.kind_from_models(await response.json(content_type=None))
                self.kinds.learn(url, detected)
                return {"kind": detected, "detected": True}

        return {"url": url, **(await _timed(get))}


async def _timed(check: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except Exception as exc:
        return {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:300]}
    result = {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
    if isinstance(detail, dict):
        result.update(detail)
    return result


_ping_in_flight: concurrent.futures.Future[dict[str, Any]] | None = None


async def _ping_database() -> dict[str, Any]:
    """One query on the health thread; while it hangs (a hung database), later checks wait for
    that one instead of queueing a new one a second behind it."""
    global _ping_in_flight
    if _ping_in_flight is None or _ping_in_flight.done():
        _ping_in_flight = _health_db.submit(_ping)
    return await asyncio.wrap_future(_ping_in_flight)


def _ping() -> dict[str, Any]:
    # The ping is two useful queries (indexed counts): dead letters waiting for a replay, and
    # quota alerts that could not be delivered in the last hour (a mail server down).
    close_old_connections()
    hour_ago = timezone.now() - timedelta(hours=1)
    return {
        "dead_letters": LedgerDeadLetter.objects.filter(replayed_at__isnull=True).count(),
        "quota_alert_failures": QuotaAlertDelivery.objects.filter(
            status=DeliveryStatus.FAILED, created_at__gte=hour_ago
        ).count(),
    }


def _count_problems(models: list[dict[str, Any]]) -> list[str]:
    """Warnings for models whose prompt counts are known not to match their upstream's."""
    problems = []
    for model in models:
        check = model.get("self_check") or {}
        if check.get("outcome") == "mismatch":
            problems.append(f"token counts for {model['name']}: {check.get('detail')}")
        elif model.get("token_counter_problem"):
            problems.append(f"token counts for {model['name']}: {model['token_counter_problem']}")
    return problems
