"""In-process caches that keep the database off the request path.

API keys: a lookup is cached for GATEWAY_KEY_CACHE_SECONDS (≤ 5 s, so a revoked key stops
working within 5 s); concurrent misses for one key share one query. Models: the whole
ServedModel table, reloaded at most every few seconds while requests keep being served from the
previous copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from django.db import close_old_connections

from quotas.services import KeyGrant, load_key_grant

log = logging.getLogger(__name__)
T = TypeVar("T")

# Database work happens on a few threads of our own, never on the event loop; each thread keeps
# its connection (CONN_MAX_AGE), so a lookup costs one query, not a connect.
_db_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gateway-db")


def _with_connection(fn: Callable[..., T], *args: Any) -> T:
    close_old_connections()
    try:
        return fn(*args)
    finally:
        close_old_connections()


async def run_db(fn: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_db_executor, _with_connection, fn, *args)


class TtlCache(Generic[T]):
    """Async get-or-load with expiry, single-flight loads and a stale fallback on load errors."""

    def __init__(
        self, load: Callable[[str], Awaitable[T]], ttl: float, max_entries: int = 100_000
    ) -> None:
        self._load = load
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, T]] = {}
        self._loading: dict[str, asyncio.Future[T]] = {}

    async def get(self, key: str) -> T:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            value = await self._load(key)
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may be none
            raise
        else:
            self._store(key, value)
            future.set_result(value)
            return value
        finally:
            del self._loading[key]

    def stale(self, key: str) -> T | None:
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def clear(self) -> None:
        self._entries.clear()

    def _store(self, key: str, value: T) -> None:
        if len(self._entries) >= self._max_entries:
            # Dicts keep insertion order: dropping the oldest tenth bounds memory under a flood
            # of random keys without a per-hit LRU bookkeeping cost.
            for old in list(self._entries)[: self._max_entries // 10 or 1]:
                del self._entries[old]
        self._entries[key] = (time.monotonic() + self._ttl, value)


class KeyCache:
    def __init__(self, ttl: float) -> None:
        self._cache: TtlCache[KeyGrant | None] = TtlCache(self._load, ttl)

    @staticmethod
    async def _load(key_hash: str) -> KeyGrant | None:
        return await run_db(load_key_grant, key_hash)

    async def get(self, key_hash: str) -> KeyGrant | None:
        try:
            return await self._cache.get(key_hash)
        except Exception:
            # Database unreachable: a key seen before keeps working (revocations need the
            # database too); an unseen key cannot be checked and the caller answers 503.
            stale = self._cache.stale(key_hash)
            if stale is not None:
                log.warning("key lookup failed; serving the cached grant", exc_info=True)
                return stale
            raise

    def clear(self) -> None:
        self._cache.clear()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    aliases: tuple[str, ...]
    upstream_url: str
    tokenizer: str
    context_length: int
    korean_factor: float | None
    request_timeout: float
    lora_adapters: tuple[str, ...] = ()
    accepts_media: bool = False
    upstream_kind: str = (
        "auto"  # gateway.models.UPSTREAM_KINDS; "auto": detected (gateway/upstream_kinds.py)
    )
    chat_template: str = ""  # the operator's template; "": the tokenizer's own
    prompt_token_offset: int = 0
    correct_offset_automatically: bool = False
    # The estimator's refit for this model as sorted (name, value) pairs (hashable), () = none.
    estimator_fit: tuple[tuple[str, float], ...] = ()
    max_concurrent_requests: int = 0  # the fair queue's capacity; 0: no queue
    # Every server of the model, upstream_url first (gateway/routing.py picks one a request).
    upstream_urls: tuple[str, ...] = ()

    def servers(self) -> tuple[str, ...]:
        return self.upstream_urls or (self.upstream_url,)


class ModelCatalog:
    """Every active ServedModel by name and alias; reloaded in the background when stale."""

    def __init__(self, default_upstream: str, ttl: float = 5.0) -> None:
        self._default_upstream = default_upstream
        self._ttl = ttl
        self._by_name: dict[str, ModelInfo] = {}
        self._models: tuple[ModelInfo, ...] = ()
        self._expires = 0.0
        self._refresh: asyncio.Task[None] | None = None
        self.on_load: Callable[[tuple[ModelInfo, ...]], None] | None = None

    async def models(self) -> tuple[ModelInfo, ...]:
        await self._fresh()
        return self._models

    async def resolve(self, name: str) -> ModelInfo | None:
        await self._fresh()
        return self._by_name.get(name)

    def snapshot(self) -> tuple[ModelInfo, ...]:
        return self._models

    async def _fresh(self) -> None:
        if time.monotonic() < self._expires:
            return
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._reload())
        if not self._models:
            # Nothing to serve from yet (first request): wait for the first load.
            await asyncio.shield(self._refresh)

    async def _reload(self) -> None:
        try:
            rows = await run_db(_load_models)
        except Exception:
            log.warning("could not reload served models; keeping the previous list", exc_info=True)
            self._expires = time.monotonic() + 1.0
            if not self._models:
                raise
            return
        models = tuple(self._info(row) for row in rows)
        by_name: dict[str, ModelInfo] = {}
        for info in models:
            for alias in info.aliases:
                by_name[alias] = info
        for info in models:
            by_name[info.name] = info
        self._models, self._by_name = models, by_name
        self._expires = time.monotonic() + self._ttl
        if self.on_load is not None:
            self.on_load(models)

    def _info(self, row: dict[str, Any]) -> ModelInfo:
        return model_info(row, self._default_upstream)


def model_info(row: dict[str, Any], default_upstream: str) -> ModelInfo:
    """A ServedModel's values (MODEL_FIELDS) as the gateway uses them."""
    from gateway.models import normalize_upstream_url

    # Normalised here too: a row written around the services (an ORM update, SQL) with the
    # OpenAI base URL must not turn every request into a 404.
    primary = normalize_upstream_url(row["upstream_url"] or default_upstream)
    more = row["more_upstream_urls"] if isinstance(row["more_upstream_urls"], list) else []
    urls = (primary, *(normalize_upstream_url(str(url)) for url in more))
    return ModelInfo(
        name=row["name"],
        aliases=tuple(str(a) for a in row["aliases"] or ()),
        upstream_url=primary,
        upstream_urls=tuple(dict.fromkeys(url for url in urls if url)),
        tokenizer=row["tokenizer"],
        context_length=row["context_length"],
        korean_factor=row["korean_factor"],
        request_timeout=row["request_timeout_seconds"],
        lora_adapters=tuple(str(a) for a in row["lora_adapters"] or ()),
        accepts_media=row["accepts_media"],
        upstream_kind=row["upstream_kind"],
        chat_template=row["chat_template"],
        prompt_token_offset=row["prompt_token_offset"],
        correct_offset_automatically=row["correct_offset_automatically"],
        estimator_fit=fit_pairs(row["estimator_fit"]),
        max_concurrent_requests=row["max_concurrent_requests"],
    )


def fit_pairs(fit: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(fit, dict):
        return ()
    return tuple(sorted((str(k), float(v)) for k, v in fit.items() if isinstance(v, int | float)))


def _load_models(active_only: bool = True) -> list[dict[str, Any]]:
    from gateway.models import ServedModel

    models = ServedModel.objects.all()
    if active_only:
        models = models.filter(is_active=True)
    return list(models.values(*MODEL_FIELDS))


def stored_models(default_upstream: str, *, active_only: bool = True) -> list[ModelInfo]:
    """The served models as the gateway uses them, read now (checks and telemetry; the
    gateway itself reads them through ModelCatalog)."""
    return [model_info(row, default_upstream) for row in _load_models(active_only)]


MODEL_FIELDS = (
    "name",
    "aliases",
    "upstream_url",
    "tokenizer",
    "context_length",
    "korean_factor",
    "request_timeout_seconds",
    "lora_adapters",
    "accepts_media",
    "upstream_kind",
    "chat_template",
    "prompt_token_offset",
    "correct_offset_automatically",
    "estimator_fit",
    "max_concurrent_requests",
    "more_upstream_urls",
)
