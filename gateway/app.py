"""The gateway: a raw ASGI app for `/v1/`, `/health` and `/metrics`, mounted ahead of Django.

A raw ASGI app rather than Django views or an AsyncHttpConsumer because, measured inside this
stack (docs/benchmarks.md), it cost 0.1-0.35 ms of CPU per request against 2-3 ms for a Django
async view, and AsyncHttpConsumer never noticed a client disconnect. Django still owns the ORM,
admin, REST API and pages; this path touches the database only through caches.

Every answer is JSON with an `x-request-id`, whatever goes wrong: unknown paths, wrong methods,
refusals, upstream failures and the gateway's own bugs (a JSON 500, never a traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from gateway import metrics, monitoring, upstream_kinds
from gateway.asgi_io import (
    AsgiScope,
    ClientDisconnected,
    Receive,
    Responder,
    Send,
    header,
    header_count,
    read_body,
)
from gateway.caches import KeyCache, ModelCatalog, ModelInfo
from gateway.counting import Counters
from gateway.embedded_beat import embedded_beat
from gateway.errors import GatewayError, invalid
from gateway.health import LIVE, Readiness
from gateway.ledger import LedgerWriter, Outcome, RequestFacts, usage_row
from gateway.limits import GatewayLimiter, shared_backend
from gateway.preparation import Prepared, UpstreamTarget, prepare, tokenize, upstream_body
from gateway.proxy import Call, Proxy
from gateway.request_schema import CHAT, COMPLETIONS, TOKENIZE, Context, require_model, validate
from gateway.routing import Router, routing_key
from gateway.scheduling import Place, Scheduler, Shape, make_queue
from gateway.self_check import SelfChecker
from gateway.stats import StatsPublisher
from gateway.upstream import Upstream, tokenize_upstream
from gateway.upstream_kinds import DetectedKinds
from quotas.request_policy import model_allowed
from quotas.services import KeyGrant
from tokenlimit import log_context
from tokenlimit.limiter import Clock, ratelimit_headers, system_clock
from tokenlimit.tokens import TokenCounter

log = logging.getLogger(__name__)

Handler = Callable[[AsgiScope, Receive, Responder], Awaitable[None]]


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
        # Model edits reach this process as soon as key edits do.
        self.catalog = ModelCatalog(settings.SGLANG_URL, settings.GATEWAY_KEY_CACHE_SECONDS)
        self.counters = Counters()
        self.catalog.on_load = self._catalog_loaded
        self.ledger = LedgerWriter(
            settings.GATEWAY_LEDGER_FLUSH_SECONDS,
            settings.GATEWAY_LEDGER_MAX_PENDING,
            settings.LEDGER_SPOOL_DIR,
            settings.GATEWAY_LEDGER_CHECKPOINT_SECONDS,
        )
        self.upstream = Upstream()
        self.limits = GatewayLimiter(shared_backend(), clock)
        # Kinds of the "auto" upstreams, learnt by readiness checks; the proxy aborts by them.
        self.kinds = DetectedKinds()
        # Which server of a model with several takes a request (loads read in the background).
        self.router = Router()
        self._routing: asyncio.Future[None] | None = None
        self.proxy = Proxy(
            self.upstream, self.counters, self.ledger, self.limits, self.kinds, self.router
        )
        # Models with places upstream: who goes next when their server is full.
        self.scheduler = Scheduler(make_queue())
        self.stats = StatsPublisher()
        self.self_check = SelfChecker(self.counters, self.upstream)
        self._rechecks: asyncio.Future[None] | None = None
        self._detecting: dict[str, asyncio.Future[None]] = {}
        self.readiness = Readiness(
            self.catalog, self.upstream, self.ledger, lambda: self.stats.in_flight,
            self.counters.source, self.kinds, self._self_check_summary, self.counters.problem,
        )  # fmt: skip
        self.beat = embedded_beat()
        self._warm_up: asyncio.Future[None] | None = None
        self._adoption: asyncio.Future[None] | None = None
        self.routes: dict[str, tuple[str, Handler]] = {
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/v1/completions": ("POST", self.completions),
            "/v1/models": ("GET", self.list_models),
            "/v1/tokenize": ("POST", self.serve_tokenize),
            "/health": ("GET", self.serve_health),
            "/health/ready": ("GET", self.serve_health_ready),
            "/metrics": ("GET", self.serve_metrics),
        }

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        out = Responder(send, uuid.uuid4().hex)
        # Every line logged under this request carries its id (each ASGI call is its own task,
        # so the value ends with it).
        log_context.request_id.set(out.request_id)
        try:
            await self._dispatch(scope, receive, out)
        except ClientDisconnected:
            pass
        except GatewayError as exc:
            await out.fail(exc)
        except Exception:
            # Operators get the traceback in the log; the client an OpenAI-shaped 500.
            log.exception("unhandled error on %r (request %s)", scope.get("path"), out.request_id)
            await out.fail(internal_error(out.request_id))

    async def _dispatch(self, scope: AsgiScope, receive: Receive, out: Responder) -> None:
        path = scope["path"]
        route = self.routes.get(path.rstrip("/") or "/")
        if route is None:
            raise GatewayError(
                404, f"Unknown path {path[:200]!r}.", code="unknown_url", type_="not_found_error"
            )
        method, handler = route
        asked = scope["method"]
        if asked != method and not (asked == "HEAD" and method == "GET"):
            raise GatewayError(
                405,
                f"{asked[:20]} is not allowed here; use {method}.",
                code="method_not_allowed",
                headers=[(b"allow", method.encode())],
            )
        await handler(scope, receive, out)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # uvicorn speaks lifespan (Daphne does not): close the upstream pool cleanly on exit.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._lifespan_startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _lifespan_startup(self) -> None:
        # Load the served models (and, from them, the tokenizers) now rather than on the first
        # request; a database that is not up yet is retried then. (Kept as an attribute: a
        # task nobody references may be garbage-collected.)
        self._warm_up = asyncio.ensure_future(self._load_catalog())
        self._start_ledger()

    def _start_ledger(self) -> None:
        """Spool and shipping thread now, and adoption of dead gateways' spools now and then:
        at start-up under uvicorn (lifespan), at the first request under Daphne. The periodic
        tokenizer self-check starts with them."""
        if self._adoption is None:
            self.ledger.start()
            self._adoption = asyncio.ensure_future(self._adopt_dead_spools())
        if self._rechecks is None and settings.GATEWAY_SELF_CHECK:
            self._rechecks = asyncio.ensure_future(self._recheck_periodically())
        if self._routing is None:
            self._routing = asyncio.ensure_future(
                self.router.run(self.upstream.session, self.catalog.snapshot)
            )

    def _self_check_summary(self, name: str) -> dict[str, Any] | None:
        result = self.self_check.results.get(name)
        return result.summary() if result is not None else None

    def _catalog_loaded(self, models: tuple[ModelInfo, ...]) -> None:
        self.counters.preload(models)  # tokenizers load at start-up, not on a first request
        self.self_check.on_catalog(models)
        # "auto" upstreams: learn their kind now (the abort route depends on it), not only
        # when someone reads /health/ready.
        for url, kind in upstream_kinds.upstreams(models).items():
            if self.kinds.kind(url, kind) is None and url not in self._detecting:
                self._detecting[url] = asyncio.ensure_future(self._detect(url, kind))

    async def _detect(self, url: str, kind: str) -> None:
        try:
            await self.readiness.probe_upstream(url, kind)  # never raises: a report
        finally:
            self._detecting.pop(url, None)

    async def _recheck_periodically(self) -> None:
        while True:
            await asyncio.sleep(settings.GATEWAY_SELF_CHECK_SECONDS)
            self.self_check.due(self.catalog.snapshot())

    async def _adopt_dead_spools(self) -> None:
        while True:
            try:
                closed = await asyncio.to_thread(self.ledger.adopt_dead)
                await self.limits.release_interrupted(closed)
            except Exception:
                log.exception("adopting the spools of dead gateways failed; retrying later")
            await asyncio.sleep(settings.GATEWAY_LEDGER_ADOPT_SECONDS)

    async def close(self) -> None:
        """Shut down cleanly: ship the ledger, close every pool (lifespan shutdown, tests)."""
        for task in (self._rechecks, self._routing):
            if task is not None:
                task.cancel()
        self._rechecks = self._routing = None
        adoption, self._adoption = self._adoption, None
        if adoption is not None:
            adoption.cancel()
            if adoption.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await adoption
        await asyncio.to_thread(self.ledger.close)
        for pool in (self.limits, self.readiness, self.upstream, self.scheduler):
            try:
                await pool.close()
            except Exception:  # a pool made on another loop (tests) cannot be closed here
                log.warning("could not close %s cleanly", type(pool).__name__, exc_info=True)

    async def _load_catalog(self) -> None:
        try:
            await self.catalog.models()
        except Exception:
            log.warning("could not load the served models at start-up", exc_info=True)
        # Said at start, not only when someone reads /health/ready.
        problem = (await self.readiness.redis_state()).get("persistence_problem")
        if problem:
            log.error("not ready: %s", problem)

    async def authenticate(self, scope: AsgiScope) -> KeyGrant:
        if header_count(scope, b"authorization") > 1:
            # Proxies and servers disagree on which of two wins: refuse rather than guess.
            raise invalid(
                "Send exactly one Authorization header.",
                param="authorization",
                code="duplicate_authorization",
            )
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

    async def chat_completions(self, scope: AsgiScope, receive: Receive, out: Responder) -> None:
        await self._completion(scope, receive, out, CHAT)

    async def completions(self, scope: AsgiScope, receive: Receive, out: Responder) -> None:
        await self._completion(scope, receive, out, COMPLETIONS)

    async def _completion(
        self, scope: AsgiScope, receive: Receive, out: Responder, endpoint: str
    ) -> None:
        grant = await self.authenticate(scope)
        started = time.time()
        self._start_ledger()
        with self._recording_refusals(grant, endpoint, started, out.request_id):
            call = await self._admit(scope, receive, grant, endpoint, out.request_id)
            place = await self._place(call, receive)
        self.stats.ensure_running()
        if self.beat is not None:
            self.beat.start()
        self.stats.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            await self.proxy.run(call, receive, out)
        finally:
            await place.release()
            self.stats.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            self.stats.count(call.status, call.billed)

    async def _place(self, call: Call, receive: Receive) -> Place:
        """A place on the model's server (gateway/scheduling.py). Refused, or the client gone
        while waiting: the limiter's reservation goes back at once (nothing was used)."""
        try:
            place = await self.scheduler.acquire(
                call.model, call.grant, call.request_id, call.reserved, receive,
                Shape(call.streamed, call.prompt_count),
            )  # fmt: skip
            call.first_token = place.prefilled
            return place
        except BaseException:
            await self.limits.settle(call.grant, call.request_id, 0)
            raise

    @contextlib.contextmanager
    def _recording_refusals(
        self, grant: KeyGrant, endpoint: str, started: float, request_id: str
    ) -> Iterator[None]:
        """An authenticated request that fails before admission still gets its one row: the
        refusal, or a 500 for a bug of ours (the client gets the same 500 from __call__)."""
        try:
            yield
        except GatewayError as exc:
            self._refused(grant, endpoint, started, exc, request_id)
            raise
        except ClientDisconnected:
            # Gone before its body arrived: nginx's 499, and no answer to send.
            left = GatewayError(499, "The client closed the request.", type_="client_closed")
            self._refused(grant, endpoint, started, left, request_id)
            raise
        except Exception:
            self._refused(grant, endpoint, started, internal_error(request_id), request_id)
            raise

    def _refused(
        self, grant: KeyGrant, endpoint: str, started: float, exc: GatewayError, request_id: str
    ) -> None:
        """Refused after authentication: still one ledger row (429s by kind, 4xx by type)."""
        facts = RequestFacts(request_id, grant.user_id, grant.key_id, "", endpoint, False, started)
        self.ledger.record(usage_row(facts, Outcome(status=exc.status, error_type=exc.type)))
        metrics.observe_refused(grant.username, exc.status, exc.type)
        self.stats.count(exc.status)

    async def _read(
        self, scope: AsgiScope, receive: Receive, grant: KeyGrant, adapters: bool
    ) -> ModelRequest:
        """Read and parse the body, resolve the model it names (and, with `adapters`, the LoRA
        adapter) and get the model's token counter."""
        body = await read_body(
            scope, receive, settings.GATEWAY_MAX_BODY_BYTES, settings.GATEWAY_BODY_TIMEOUT_SECONDS
        )
        data = await self.counters.parse(grant.user_id, body)
        requested = require_model(data)
        lora_path = data.get("lora_path") if adapters else None
        model, adapter = await self._resolve(requested, lora_path, grant)
        counter = await self.counters.get(model)
        return ModelRequest(len(body), data, requested, model, adapter, counter)

    async def _prepare(
        self, scope: AsgiScope, receive: Receive, grant: KeyGrant, endpoint: str, request_id: str
    ) -> tuple[str, ModelInfo, Prepared]:
        """(the model name the client asked for, the model it resolves to, the prepared call)"""
        request = await self._read(scope, receive, grant, adapters=True)
        model, counter = request.model, request.counter
        ctx = Context(
            vocab_size=counter.vocab_size,
            accepts_media=model.accepts_media,
            max_choices=settings.GATEWAY_MAX_CHOICES,
            extra_fields=grant.access.extra_fields,
        )
        target = UpstreamTarget(model.name, request.adapter, request_id, grant.access)
        prepared = await self.counters.prepare(
            request.size, grant.user_id, prepare, endpoint, request.data, ctx, counter,
            model.context_length, target, model.prompt_token_offset,
        )  # fmt: skip
        return request.requested, model, prepared

    async def _admit(
        self, scope: AsgiScope, receive: Receive, grant: KeyGrant, endpoint: str, request_id: str
    ) -> Call:
        requested, model, prepared = await self._prepare(
            scope, receive, grant, endpoint, request_id
        )
        budget = prepared.budget
        floor = prepared.flexible_floor(settings.LIMITER_MIN_COMPLETION_TOKENS)
        decision = await self.limits.admit(grant, request_id, budget.reserved, requested, floor)
        reserved = decision.requested if decision is not None and floor else budget.reserved
        headers = ratelimit_headers(decision.state) if decision is not None else []
        body = prepared.upstream_body
        if budget.forced_max is not None:
            # No max_tokens from the client: the gateway chose one (README, "max_tokens").
            chosen, reason = budget.forced_max, b"default"
            if reserved < budget.reserved:  # what the windows still allowed
                chosen, reason = prepared.per_choice_within(reserved), b"limit"
                body = await self.counters.run(
                    grant.user_id, len(body), upstream_body, prepared.valid, prepared.target, chosen
                )
            headers += [
                (b"x-gateway-max-tokens", str(chosen).encode()),
                (b"x-gateway-max-tokens-reason", reason),
            ]
        return Call(
            request_id=request_id,
            grant=grant,
            model=model,
            endpoint=endpoint,
            upstream_body=body,
            streamed=prepared.valid.stream,
            client_wants_usage=prepared.valid.client_wants_usage,
            prompt_count=prepared.prompt_tokens,
            reserved=reserved,
            headers=headers,
            affinity=routing_key(model, grant.user_id, prepared.valid.fields),
        )

    async def _resolve(
        self, requested: str, lora_path: object, grant: KeyGrant
    ) -> tuple[ModelInfo, str | None]:
        """The served model and LoRA adapter a request names, if this key may use them.

        An adapter is named as `model:adapter` (SGLang's syntax) or with `lora_path`; it must
        be one the model lists and the plan allows.
        """
        model = await self.catalog.resolve(requested)
        adapter: str | None = None
        if model is None and ":" in requested:
            base, _, adapter = requested.rpartition(":")
            model = await self.catalog.resolve(base)
        if lora_path is not None:
            if not isinstance(lora_path, str) or (adapter is not None and adapter != lora_path):
                raise invalid(
                    "lora_path must be one adapter name (the same as in model, if named there).",
                    param="lora_path",
                )
            adapter = lora_path
        if model is None or not _allowed(model, grant, adapter):
            raise not_found(requested)
        if adapter is not None and adapter not in model.lora_adapters:
            raise not_found(f"{model.name}:{adapter}")
        return model, adapter

    async def list_models(self, scope: AsgiScope, receive: Receive, out: Responder) -> None:
        grant = await self.authenticate(scope)
        cards = []
        for model in await self.catalog.models():
            if _allowed(model, grant, None):
                for name in (model.name, *model.aliases):
                    cards.append(_card(name, model.name, model.context_length))
            for adapter in model.lora_adapters:
                if _allowed(model, grant, adapter):
                    card = _card(f"{model.name}:{adapter}", model.name, model.context_length)
                    cards.append({**card, "parent": model.name})
        await out.json(200, {"object": "list", "data": cards})

    async def serve_tokenize(self, scope: AsgiScope, receive: Receive, out: Responder) -> None:
        """Authenticated, admitted as a request (no tokens reserved), recorded, never billed."""
        grant = await self.authenticate(scope)
        started = time.time()
        request_id = out.request_id
        self._start_ledger()
        with self._recording_refusals(grant, TOKENIZE, started, request_id):
            request = await self._read(scope, receive, grant, adapters=False)
            model, counter = request.model, request.counter
            ctx = Context(vocab_size=counter.vocab_size)
            # Checked before admission (a malformed request takes no request from the quota),
            # and off the loop like every other body.
            valid = await self.counters.run(
                grant.user_id, request.size, validate, TOKENIZE, request.data, ctx
            )
            decision = await self.limits.admit(grant, request_id, 0, request.requested)
        facts = RequestFacts(
            request_id, grant.user_id, grant.key_id, model.name, TOKENIZE, streamed=False,
            started_at=started, scopes=self.limits.held_scopes(request_id),
        )  # fmt: skip
        self.ledger.open(facts)
        outcome = Outcome(status=500, error_type="server_error")
        try:
            result = await self.counters.prepare(
                request.size, grant.user_id, tokenize, counter, valid.fields, model.context_length
            )
            if result.get("estimated"):
                result = await self._tokenized_upstream(model, valid.fields) or result
            # Counted, never billed: the count is the gateway's own (estimated_prompt_tokens).
            facts.prompt_tokens, outcome = result["count"], Outcome(status=200)
            headers = ratelimit_headers(decision.state) if decision is not None else []
            await out.json(200, result, headers)
        except GatewayError as exc:
            outcome = Outcome(status=exc.status, error_type=exc.type)
            raise
        finally:
            await self.limits.settle(grant, request_id, 0)
            self.ledger.record(usage_row(facts, outcome))

    async def _tokenized_upstream(
        self, model: ModelInfo, fields: dict[str, Any]
    ) -> dict[str, Any] | None:
        """A prompt the gateway can only estimate, tokenized by an upstream that can (SGLang,
        vLLM): exact ids for the client, at the cost of one upstream call. Chat messages are
        not passed on: the upstream's tokenize routes differ in what they accept for them."""
        kind = self.kinds.kind(model.upstream_url, model.upstream_kind)
        path = upstream_kinds.traits(kind).tokenize_path if kind is not None else ""
        prompt = fields.get("prompt")
        if not path or not isinstance(prompt, str):
            return None
        tokens = await tokenize_upstream(
            self.upstream.session(), f"{model.upstream_url}{path}", model.name, prompt,
            bool(fields.get("add_special_tokens", True)),
        )  # fmt: skip
        if tokens is None:
            return None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": model.context_length}

    async def serve_metrics(self, scope: AsgiScope, receive: Receive, out: Responder) -> None:
        if not monitoring.is_monitoring(scope):
            raise monitoring.forbidden("/metrics")
        report = await self.readiness.report()
        ledger = report["ledger"]
        metrics.observe_readiness(report)
        metrics.LEDGER_BACKLOG.set(self.ledger.pending)
        metrics.LEDGER_OLDEST_PENDING.set(ledger["oldest_pending_seconds"])
        if ledger.get("dead_letters") is not None:
            metrics.LEDGER_DEAD_LETTERS.set(ledger["dead_letters"])
        if ledger.get("stream_backlog") is not None:
            metrics.LEDGER_STREAM_BACKLOG.set(ledger["stream_backlog"])
        body, content_type = metrics.exposition()
        await out.start(200, [(b"content-type", content_type.encode())])
        await out.body(body)

    async def serve_health(self, scope: AsgiScope, receive: Receive, out: Responder) -> None:
        """Liveness: this process answers. Nothing else is said or checked."""
        if scope["method"] == "HEAD":
            await out.start(200, [(b"content-type", b"application/json")])
            await out.body(b"")
            return
        await out.json(200, LIVE, [(b"cache-control", b"no-store")])

    async def serve_health_ready(self, scope: AsgiScope, receive: Receive, out: Responder) -> None:
        if not (monitoring.is_monitoring(scope) or await monitoring.is_staff_session(scope)):
            raise monitoring.forbidden("/health/ready")
        report = await self.readiness.report()
        status = 503 if report["status"] in ("unavailable", "starting") else 200
        await out.json(status, report, [(b"cache-control", b"no-store")])


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """A request body as read, and the served model (and adapter) it names."""

    size: int  # bytes of the body
    data: dict[str, Any]
    requested: str  # the model name as the client wrote it
    model: ModelInfo
    adapter: str | None
    counter: TokenCounter


def internal_error(request_id: str) -> GatewayError:
    return GatewayError(
        500,
        f"The gateway failed to handle this request (request id {request_id}).",
        type_="server_error",
    )


def _allowed(model: ModelInfo, grant: KeyGrant, adapter: str | None) -> bool:
    allowed = grant.limits.allowed_models
    return not allowed or model_allowed(allowed, (model.name, *model.aliases), adapter)


def _card(name: str, root: str, context_length: int) -> dict[str, object]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "sglang",
        "root": root,
        "max_model_len": context_length,
    }


def _unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(
        401, message, type_="invalid_request_error", code=code,
        headers=[(b"www-authenticate", b'Bearer realm="api"')],
    )  # fmt: skip


def _redact(token: str) -> str:
    return token[:6] + "*" * 4 + token[-4:] if len(token) > 12 else "****"
