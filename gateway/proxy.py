"""Proxying one completion request: count, send upstream, relay, settle, record.

Each request is a `Call`. The relay runs as its own task next to a task that waits for the
client's `http.disconnect`; a disconnect cancels the relay, which closes the upstream
connection at once (SGLang aborts generation when its client goes away) and still records
what was generated so far.

A model with several servers (gateway/routing.py): the router picks one; a connection it
refuses is tried on the next (nothing was sent), and so is a pooled connection it dropped
before answering when it then refuses a new one (a dead server runs nothing). Nothing is sent
twice to a server that may have it, and nothing is retried once the answer started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway import metrics
from gateway.asgi_io import SSE_HEADERS, Headers, Receive, Responder, wait_for_disconnect
from gateway.caches import ModelInfo
from gateway.counting import Counters
from gateway.errors import GatewayError, error_body, rewrite_upstream_error
from gateway.ledger import LedgerWriter, Outcome, RequestFacts, usage_row
from gateway.limits import GatewayLimiter
from gateway.routing import Router
from gateway.sse import (
    DONE,
    EventSplitter,
    StreamAccount,
    Usage,
    response_usage,
    usage_chunk,
    with_usage,
)
from gateway.upstream import Upstream, timed_out, timeouts, unreachable
from gateway.upstream_kinds import DetectedKinds, traits
from quotas.services import KeyGrant

log = logging.getLogger(__name__)
ABORT_TIMEOUT_SECONDS = 2.0
DEAD_PROBE_SECONDS = 1.0
MISMATCH_LOG_SECONDS = 600.0


class Refused(Exception):
    """The server never had the request: another may take it."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(slots=True)
class Call:
    request_id: str
    grant: KeyGrant
    model: ModelInfo
    endpoint: str
    upstream_body: bytes  # rebuilt from checked fields (gateway/preparation.py)
    streamed: bool
    client_wants_usage: bool
    started_at: float = field(default_factory=time.time)
    started_perf: float = field(default_factory=time.perf_counter)
    prompt_count: int = 0
    reserved: int = 0
    billed: int = 0  # prompt + completion, as settled
    headers: Headers = field(default_factory=list)
    status: int = 0
    error_type: str = ""
    usage: Usage | None = None
    usage_source: str = "upstream"  # "gateway": counted here, the upstream reported none
    generated_text: str = ""
    client_disconnected: bool = False
    upstream_latency_ms: float | None = None
    ttft_ms: float | None = None
    facts: RequestFacts | None = None  # as written ahead; the row is built from the same
    affinity: str = ""  # gateway/routing.py: requests with the same key prefer one server
    first_token: Callable[[], None] = lambda: None  # told when the first token arrives
    upstream_url: str = ""  # the server it went to (the last one tried)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started_perf) * 1000.0


class Proxy:
    def __init__(
        self,
        upstream: Upstream,
        counters: Counters,
        ledger: LedgerWriter,
        limits: GatewayLimiter,
        kinds: DetectedKinds | None = None,
        router: Router | None = None,
    ) -> None:
        self.upstream = upstream
        self.router = router or Router()
        self.counters = counters
        self.ledger = ledger
        self.limits = limits
        self.kinds = kinds or DetectedKinds()
        self._aborts: set[asyncio.Task[None]] = set()
        self._mismatches: dict[str, int] = {}
        self._mismatch_logged: dict[str, float] = {}

    async def run(self, call: Call, receive: Receive, out: Responder) -> None:
        """Relay the call while watching for the client leaving; always settles and records."""
        call.facts = self._facts(call, self.limits.held_scopes(call.request_id))
        self.ledger.open(call.facts)
        relay: asyncio.Future[None] | None = None
        watcher: asyncio.Future[None] | None = None
        try:
            relay = asyncio.ensure_future(self._relay(call, out, call.headers))
            watcher = asyncio.ensure_future(wait_for_disconnect(receive))
            await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not relay.done():
                call.client_disconnected = True
                relay.cancel()
                self._abort_upstream(call)
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
            else:
                relay.result()  # re-raise errors from the relay
        except Exception:
            # A bug of ours: the client gets a 500 (app.py), unless a stream had started, and
            # the row says so rather than status 0.
            if not out.started:
                call.status = 500
            call.error_type = call.error_type or "server_error"
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if relay is not None and not relay.done():
                relay.cancel()
            await self._settle(call)

    def _mismatch_seen(self, call: Call, usage: Usage) -> None:
        """Equal unless the chat template or tokenizer differs from the upstream's (the admin
        shows how often: reconciliation column; and why: the tokenizer self-check). Logged at
        most once per model per MISMATCH_LOG_SECONDS with how many since: an estimating model
        differs on every request, and a line per request said nothing new."""
        self._mismatches[call.model.name] = self._mismatches.get(call.model.name, 0) + 1
        now = time.monotonic()
        if now < self._mismatch_logged.get(call.model.name, 0.0):
            return
        self._mismatch_logged[call.model.name] = now + MISMATCH_LOG_SECONDS
        log.warning(
            "prompt count mismatch for %s: gateway %d, upstream %d (request %s); "
            "%d mismatches since the last such line",
            call.model.name, call.prompt_count, usage.prompt_tokens, call.request_id,
            self._mismatches.pop(call.model.name),
        )  # fmt: skip

    def _abort_upstream(self, call: Call) -> None:
        """Closing the connection stops generation on every kind of server; SGLang also has
        /abort_request by rid, the explicit route (some releases kept decoding after a close:
        ../shared/reference/sglang.md). Fire and forget: the client is gone already."""
        url = call.upstream_url or call.model.upstream_url
        kind = self.kinds.kind(url, call.model.upstream_kind)
        path = traits(kind).abort_path if kind is not None else ""
        if not path:
            return
        task = asyncio.ensure_future(self._post_abort(f"{url}{path}", call))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _post_abort(self, url: str, call: Call) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=ABORT_TIMEOUT_SECONDS)
            async with self.upstream.session().post(
                url, json={"rid": call.request_id}, timeout=timeout
            ) as response:
                await response.read()
        except Exception as exc:  # the connection is closed anyway; SGLang aborts on that too
            log.info("abort of %s at %s failed: %s", call.request_id, url, exc)

    @staticmethod
    def _facts(call: Call, scopes: list[list[Any]] | None = None) -> RequestFacts:
        return RequestFacts(
            request_id=call.request_id,
            user_id=call.grant.user_id,
            api_key_id=call.grant.key_id,
            model=call.model.name,
            endpoint=call.endpoint,
            streamed=call.streamed,
            started_at=call.started_at,
            prompt_tokens=call.prompt_count,
            scopes=scopes or [],
        )

    async def _relay(self, call: Call, out: Responder, headers: Headers) -> None:
        tried: set[str] = set()
        last: BaseException = ConnectionRefusedError()
        while True:
            url = self.router.choose(call.model, call.affinity, frozenset(tried))
            if not url:  # every server refused: the last one's error
                await self._fail(call, out, headers, unreachable(call.upstream_url, last))
                return
            if tried:
                metrics.UPSTREAM_RETRIES.labels(call.model.name).inc()
            call.upstream_url = url
            several = len(call.model.servers()) > 1
            if several:
                self.router.started(url)
            try:
                await self._relay_to(url, call, out, headers)
                if several:
                    self.router.answered(url)
                return
            except Refused as refused:
                last = refused.cause
                tried.add(url)
                if several:
                    self.router.refused(url)
            finally:
                if several:
                    self.router.finished(url)

    async def _relay_to(self, url: str, call: Call, out: Responder, headers: Headers) -> None:
        """The call on one server; Refused when that server cannot have had it."""
        session = self.upstream.session()
        answered = False
        try:
            async with session.post(
                f"{url}/v1/{call.endpoint}",
                data=call.upstream_body,
                headers={"Content-Type": "application/json", "X-Request-Id": call.request_id},
                timeout=timeouts(call.model.request_timeout, call.streamed),
            ) as response:
                answered = True
                call.upstream_latency_ms = call.elapsed_ms()
                if response.status != 200 or not call.streamed:
                    await self._relay_whole(call, response, out, headers)
                else:
                    await self._relay_stream(call, response, out, headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise Refused(exc) from exc  # no connection: nothing was sent
        except (TimeoutError, aiohttp.ServerTimeoutError):
            await self._fail(call, out, headers, timed_out(url))
        except aiohttp.ClientError as exc:
            # A pooled connection dropped before any answer: sent, perhaps. Retried only if
            # the server now refuses connections: a dead server is running nothing.
            if not answered and not out.started and await self._refuses(url):
                raise Refused(exc) from exc
            await self._fail(call, out, headers, unreachable(url, exc))

    async def _refuses(self, url: str) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=DEAD_PROBE_SECONDS)
            async with self.upstream.session().get(f"{url}/health", timeout=timeout):
                return False
        except aiohttp.ClientConnectorError:
            return True
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _relay_whole(
        self, call: Call, response: aiohttp.ClientResponse, out: Responder, headers: Headers
    ) -> None:
        raw = await response.read()
        call.status = response.status
        call.upstream_latency_ms = call.elapsed_ms()
        if response.status == 200:
            call.usage, call.generated_text = response_usage(raw)
            if call.usage is None:
                # A server that reports no usage (some OpenAI-compatible ones): the client
                # still gets the usage OpenAI always sends, from the gateway's own count.
                call.usage = await self._counted_usage(call, call.generated_text)
                call.usage_source = "gateway"
                raw = with_usage(raw, call.usage)
            await out.complete(200, raw, headers)
            return
        body = rewrite_upstream_error(response.status, raw)
        call.error_type = _error_type(body)
        await out.complete(response.status, body, headers)

    async def _relay_stream(
        self, call: Call, response: aiohttp.ClientResponse, out: Responder, headers: Headers
    ) -> None:
        call.status = 200
        await out.start(200, [*SSE_HEADERS, *headers])
        splitter = EventSplitter()
        account = StreamAccount()
        every = self.ledger.checkpoint_seconds
        checkpoint = time.monotonic() + every
        try:
            async for chunk in response.content.iter_any():
                for event in splitter.feed(chunk):
                    if call.ttft_ms is None:
                        call.ttft_ms = call.elapsed_ms()
                        call.first_token()
                    if account.inspect(event) or call.client_wants_usage:
                        if _held_back(event, account, call):
                            continue
                        await out.body(event + b"\n\n", more=True)
                if time.monotonic() >= checkpoint:
                    # What a crash of this process would bill (gateway/ledger.py).
                    checkpoint = time.monotonic() + every
                    # An upstream that reports usage on every chunk (SGLang's
                    # continuous_usage_stats) is exact; otherwise the pieces, a lower bound.
                    so_far = account.usage.completion_tokens if account.usage else 0
                    self.ledger.progress(
                        call.request_id, max(so_far, account.output_pieces()), True
                    )
            rest = splitter.rest()
            kept = rest.strip() and (account.inspect(rest) or call.client_wants_usage)
            if kept and not _held_back(rest, account, call):
                await out.body(rest + b"\n\n", more=True)
            if _held_back(DONE, account, call) and account.saw_done:
                await self._send_counted_usage(call, account, out)
        except asyncio.CancelledError:
            # The client left: drop the upstream connection now so SGLang aborts generation.
            response.close()
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Headers are gone already: tell the client in the stream, as SGLang itself does.
            account.error = (
                "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_error"
            )
            message = f"The model server stopped answering mid-stream ({exc.__class__.__name__})."
            await out.body(b"data: " + error_body(message, account.error) + b"\n\n", more=True)
        finally:
            call.usage = account.usage
            call.error_type = account.error
            if account.usage is None:
                call.generated_text = account.generated_text()
        await out.body(b"")

    async def _send_counted_usage(self, call: Call, account: StreamAccount, out: Responder) -> None:
        """The usage chunk the client asked for (stream_options.include_usage) when the upstream
        sent none: the gateway's own count, marked `"usage_source": "gateway"`, then the
        [DONE] that was held back for it."""
        call.usage = await self._counted_usage(call, account.generated_text())
        call.usage_source = "gateway"
        chunk = usage_chunk(account.last_payload(), call.usage)
        await out.body(b"data: " + chunk + b"\n\n" + DONE + b"\n\n", more=True)

    async def _counted_usage(self, call: Call, text: str) -> Usage:
        """Usage counted here: the prompt as counted at admission, the completion from the
        generated text, never above what the request allowed (its max_tokens × choices, all
        that was reserved): a tokenizer the gateway lacks must not over-bill."""
        completion = 0
        if text:
            completion = await self.counters.count_completion(call.grant.user_id, call.model, text)
        if call.reserved:
            completion = min(completion, max(call.reserved - call.prompt_count, 0))
        return Usage(prompt_tokens=call.prompt_count, completion_tokens=completion)

    async def _fail(self, call: Call, out: Responder, headers: Headers, exc: GatewayError) -> None:
        call.status = exc.status
        call.error_type = exc.type if exc.code is None else str(exc.code)
        if out.started:
            await out.body(b"data: " + exc.body() + b"\n\n", more=False)
        else:
            await out.error(exc, headers)

    async def _settle(self, call: Call) -> None:
        usage, source = call.usage, call.usage_source
        if (
            source == "upstream"
            and usage is not None
            and call.prompt_count
            and usage.prompt_tokens != call.prompt_count
        ):
            self._mismatch_seen(call, usage)
        if usage is None:
            usage = await self._counted_usage(call, call.generated_text)
            produced = call.status == 200 or usage.completion_tokens > 0
            if not produced:
                usage = Usage()
            source = "gateway" if produced else "none"
        if call.client_disconnected and call.status == 0:
            call.status = 499  # nginx's "client closed request": nothing was sent back
        outcome = Outcome(
            status=call.status,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            usage_source=source,
            error_type=call.error_type,
            client_disconnected=call.client_disconnected,
            upstream_latency_ms=call.upstream_latency_ms,
            time_to_first_token_ms=call.ttft_ms,
            upstream=call.upstream_url,
        )
        facts = call.facts or self._facts(call)
        self.ledger.record(usage_row(facts, outcome))
        if call.status >= 500 or (call.status == 200 and call.error_type):
            # Once per failed request (a 5xx, or an error inside a stream that had started):
            # enough to find it in the ledger and tell a dead upstream from a slow one.
            log.warning(
                "upstream failure for %s: status %d (%s) after %.1f ms, request %s",
                call.model.name, call.status, call.error_type or "-",
                (time.time() - facts.started_at) * 1000, call.request_id,
            )  # fmt: skip
        call.billed = usage.prompt_tokens + usage.completion_tokens
        metrics.observe_finished(
            call.model.name, call.grant.username, call.status, usage.prompt_tokens,
            usage.completion_tokens, call.upstream_latency_ms, call.ttft_ms,
        )  # fmt: skip
        # Replace the reservation with what was used: a refund, an overrun, or (nothing was
        # produced) a full release. After the ledger append, so that no failure here loses the
        # row; an unsettled reservation is released when its lease runs out.
        try:
            await self.limits.settle(call.grant, call.request_id, call.billed)
        except Exception:
            log.exception("settling %s failed", call.request_id)


def _error_type(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error.get("type") or "upstream_error")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "upstream_error"


def _held_back(event: bytes, account: StreamAccount, call: Call) -> bool:
    """[DONE] waits while the client asked for usage and the upstream has sent none yet: the
    gateway sends its own usage chunk before it (`_send_counted_usage`)."""
    return (
        event.startswith(DONE) and call.client_wants_usage and account.usage is None
        and not account.error
    )  # fmt: skip
