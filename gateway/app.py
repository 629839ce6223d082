"""The gateway: a raw ASGI app for `/v1/` and `/health`, mounted ahead of Django.

A raw ASGI app rather than Django views or an AsyncHttpConsumer because, measured inside this
stack (../shared/reference/hotpath.md), it cost 0.1-0.35 ms of CPU per request against 2-3 ms
for a Django async view, and AsyncHttpConsumer never noticed a client disconnect. Django still
owns the ORM, admin, REST API and pages; this path touches the database only through caches.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from django.conf import settings

from gateway import health, metrics
from gateway.asgi_io import (
    ClientDisconnected,
    Receive,
    Responder,
    Scope,
    Send,
    header,
    read_body,
)
from gateway.caches import KeyCache, ModelCatalog, ModelInfo
from gateway.counting import Counters
from gateway.embedded_beat import embedded_beat
from gateway.errors import GatewayError
from gateway.ledger import LedgerWriter, UsageEvent
from gateway.limits import Limits, make_backend
from gateway.proxy import CHAT, COMPLETIONS, Call, Proxy
from gateway.stats import StatsPublisher
from gateway.tokenize import check_tokenize_body, tokenize
from gateway.upstream import Upstream
from gateway.validation import parse_json_object, require_model, validate_chat, validate_completion
from quotas.limiter import Clock, ratelimit_headers, reservation_for, system_clock
from quotas.services import KeyGrant

log = logging.getLogger(__name__)

Handler = Callable[[Scope, Receive, Responder], Awaitable[None]]


def not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


class Gateway:
    def __init__(self, clock: Clock = system_clock) -> None:
        self.keys = KeyCache(settings.GATEWAY_KEY_CACHE_SECONDS)
        self.catalog = ModelCatalog(settings.SGLANG_URL)
        self.counters = Counters()
        self.catalog.on_load = self.counters.preload
        self.ledger = LedgerWriter(
            settings.GATEWAY_LEDGER_FLUSH_SECONDS,
            settings.GATEWAY_LEDGER_MAX_PENDING,
            settings.LEDGER_SPOOL_DIR,
        )
        self.upstream = Upstream()
        self.limits = Limits(make_backend(), clock)
        self.proxy = Proxy(self.upstream, self.counters, self.ledger, self.limits)
        self.stats = StatsPublisher()
        self.beat = embedded_beat()
        self.routes: dict[str, tuple[str, Handler]] = {
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/v1/completions": ("POST", self.completions),
            "/v1/models": ("GET", self.list_models),
            "/v1/tokenize": ("POST", self.tokenize),
            "/health": ("GET", self.health),
            "/metrics": ("GET", self.metrics),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        out = Responder(send)
        try:
            route = self.routes.get(scope["path"].rstrip("/") or "/")
            if route is None:
                raise GatewayError(404, f"Unknown path {scope['path']}.", code="unknown_url")
            method, handler = route
            if scope["method"] != method:
                raise GatewayError(
                    405,
                    f"{scope['method']} is not allowed here; use {method}.",
                    code="method_not_allowed",
                )
            await handler(scope, receive, out)
        except ClientDisconnected:
            pass
        except GatewayError as exc:
            if not out.started:
                await out.error(exc)
        except Exception:
            # Log the traceback for operators; the client only ever gets the OpenAI-shaped error.
            log.exception("unhandled error on %s", scope.get("path"))
            if not out.started:
                await out.error(
                    GatewayError(
                        500, "The gateway failed to handle this request.", type_="server_error"
                    )
                )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # uvicorn speaks lifespan (Daphne does not): close the upstream pool cleanly on exit.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.upstream.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def authenticate(self, scope: Scope) -> KeyGrant:
        raw = header(scope, b"authorization")
        if raw is None:
            raise _unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer sk-…'.",
                "missing_api_key",
            )
        scheme, _, token = raw.decode("latin-1").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized(
                "The Authorization header must be 'Bearer <API key>'.", "invalid_api_key"
            )
        key_hash = hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).hexdigest()
        try:
            grant = await self.keys.get(key_hash)
        except Exception:
            log.exception("key lookup failed")
            raise GatewayError(
                503,
                "API keys cannot be checked right now (the database is unavailable).",
                type_="service_unavailable",
                code="auth_unavailable",
            ) from None
        if grant is None:
            raise _unauthorized(f"Incorrect API key provided: {_redact(token)}.", "invalid_api_key")
        if not grant.is_usable_now():
            raise _unauthorized("This API key has been revoked or has expired.", "invalid_api_key")
        return grant

    async def chat_completions(self, scope: Scope, receive: Receive, out: Responder) -> None:
        await self._completion(scope, receive, out, CHAT)

    async def completions(self, scope: Scope, receive: Receive, out: Responder) -> None:
        await self._completion(scope, receive, out, COMPLETIONS)

    async def _completion(
        self, scope: Scope, receive: Receive, out: Responder, endpoint: str
    ) -> None:
        grant = await self.authenticate(scope)
        request_id = uuid.uuid4().hex
        started = time.time()
        try:
            call = await self._admit(scope, receive, grant, endpoint, request_id)
        except GatewayError as exc:
            # Refused after authentication: still one ledger row (429s by kind, 4xx by type).
            exc.headers.append((b"x-request-id", request_id.encode()))
            self.ledger.record(refused_event(request_id, grant, endpoint, started, exc))
            metrics.observe_refused(grant.username, exc.status, exc.type)
            self.stats.requests += 1
            self.stats.rate_limited += exc.status == 429
            raise
        self.stats.ensure_running()
        if self.beat is not None:
            self.beat.start()
        self.stats.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            await self.proxy.run(call, receive, out)
        finally:
            self.stats.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            self.stats.requests += 1
            self.stats.tokens += call.billed

    async def _admit(
        self, scope: Scope, receive: Receive, grant: KeyGrant, endpoint: str, request_id: str
    ) -> Call:
        body = await read_body(scope, receive, settings.GATEWAY_MAX_BODY_BYTES)
        data = parse_json_object(body)
        requested = require_model(data)
        (validate_chat if endpoint == CHAT else validate_completion)(data)
        model = await self._resolve(requested, grant)
        stream = bool(data.get("stream"))
        options = data.get("stream_options") or {}
        call = Call(
            request_id=request_id,
            grant=grant,
            model=model,
            endpoint=endpoint,
            body=data,
            streamed=stream,
            client_wants_usage=bool(options.get("include_usage")) or not stream,
            raw_body=body,
        )
        call.prompt_count = await self.counters.count_prompt(model, endpoint, data, len(body))
        call.reserved = reservation_for(
            call.prompt_count, data, model.context_length, settings.LIMITER_DEFAULT_MAX_TOKENS
        )
        decision = await self.limits.admit(grant, request_id, call.reserved, requested)
        call.headers = [(b"x-request-id", request_id.encode())]
        if decision is not None:
            call.headers.extend(ratelimit_headers(decision.state))
        return call

    async def _resolve(self, requested: str, grant: KeyGrant) -> ModelInfo:
        model = await self.catalog.resolve(requested)
        if model is None or not _allowed(model, grant):
            raise not_found(requested)
        return model

    async def list_models(self, scope: Scope, receive: Receive, out: Responder) -> None:
        grant = await self.authenticate(scope)
        cards = []
        for model in await self.catalog.models():
            if not _allowed(model, grant):
                continue
            for name in (model.name, *model.aliases):
                cards.append(
                    {
                        "id": name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "sglang",
                        "root": model.name,
                        "max_model_len": model.context_length,
                    }
                )
        await out.json(200, {"object": "list", "data": cards})

    async def tokenize(self, scope: Scope, receive: Receive, out: Responder) -> None:
        grant = await self.authenticate(scope)
        body = await read_body(scope, receive, settings.GATEWAY_MAX_BODY_BYTES)
        data = parse_json_object(body)
        model = await self._resolve(require_model(data), grant)
        check_tokenize_body(data)
        await out.json(200, await tokenize(self.counters, model, data, len(body)))

    async def metrics(self, scope: Scope, receive: Receive, out: Responder) -> None:
        metrics.LEDGER_BACKLOG.set(self.ledger.pending)
        if settings.REDIS_URL:
            backlog = (await health.report_redis()).get("ledger_stream_backlog")
            if backlog is not None:
                metrics.LEDGER_STREAM_BACKLOG.set(backlog)
        body, content_type = metrics.exposition()
        await out.start(200, [(b"content-type", content_type.encode())])
        await out.body(body)

    async def health(self, scope: Scope, receive: Receive, out: Responder) -> None:
        report = await health.report(self)
        await out.json(503 if report["status"] == "unavailable" else 200, report)


def refused_event(
    request_id: str, grant: KeyGrant, endpoint: str, started: float, exc: GatewayError
) -> UsageEvent:
    return UsageEvent(
        request_id=request_id,
        user_id=grant.user_id,
        key_id=grant.key_id,
        model="",
        endpoint=endpoint,
        status_code=exc.status,
        streamed=False,
        started_at=started,
        finished_at=time.time(),
        usage_source="none",
        error_type=exc.type,
    )


def _allowed(model: ModelInfo, grant: KeyGrant) -> bool:
    allowed = grant.limits.allowed_models
    return not allowed or model.name in allowed or any(a in allowed for a in model.aliases)


def _unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(
        401, message, type_="invalid_request_error", code=code,
        headers=[(b"www-authenticate", b'Bearer realm="api"')],
    )  # fmt: skip


def _redact(token: str) -> str:
    return token[:6] + "*" * 4 + token[-4:] if len(token) > 12 else "****"
