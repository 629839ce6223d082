"""Proxying one completion request: count, send upstream, relay, settle, record.

Each request is a `Call`. The relay runs as its own task next to a task that waits for the
client's `http.disconnect`; a disconnect cancels the relay, which closes the upstream
connection at once (SGLang aborts generation when its client goes away) and still records
what was generated so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway import metrics
from gateway.asgi_io import SSE_HEADERS, Headers, Receive, Responder
from gateway.caches import ModelInfo
from gateway.counting import Counters
from gateway.errors import GatewayError, error_body, rewrite_upstream_error
from gateway.ledger import LedgerWriter, Outcome, RequestFacts, usage_row
from gateway.limits import GatewayLimiter
from gateway.sse import EventSplitter, StreamAccount, Usage, response_usage
from gateway.upstream import Upstream, timed_out, timeouts, unreachable
from quotas.services import KeyGrant

log = logging.getLogger(__name__)


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
    generated_text: str = ""
    client_disconnected: bool = False
    upstream_latency_ms: float | None = None
    ttft_ms: float | None = None
    facts: RequestFacts | None = None  # as written ahead; the row is built from the same

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started_perf) * 1000.0


class Proxy:
    def __init__(
        self, upstream: Upstream, counters: Counters, ledger: LedgerWriter, limits: GatewayLimiter
    ) -> None:
        self.upstream = upstream
        self.counters = counters
        self.ledger = ledger
        self.limits = limits

    async def run(self, call: Call, receive: Receive, out: Responder) -> None:
        """Relay the call while watching for the client leaving; always settles and records."""
        call.facts = self._facts(call, self.limits.held_scopes(call.request_id))
        self.ledger.open(call.facts)
        relay: asyncio.Future[None] | None = None
        watcher: asyncio.Future[None] | None = None
        try:
            relay = asyncio.ensure_future(self._relay(call, out, call.headers))
            watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
            await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not relay.done():
                call.client_disconnected = True
                relay.cancel()
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
        url = f"{call.model.upstream_url}/v1/{call.endpoint}"
        session = self.upstream.session()
        try:
            async with session.post(
                url,
                data=call.upstream_body,
                headers={"Content-Type": "application/json", "X-Request-Id": call.request_id},
                timeout=timeouts(call.model.request_timeout, call.streamed),
            ) as response:
                call.upstream_latency_ms = call.elapsed_ms()
                if response.status != 200 or not call.streamed:
                    await self._relay_whole(call, response, out, headers)
                else:
                    await self._relay_stream(call, response, out, headers)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            await self._fail(call, out, headers, timed_out(call.model.upstream_url))
        except aiohttp.ClientError as exc:
            await self._fail(call, out, headers, unreachable(call.model.upstream_url, exc))

    async def _relay_whole(
        self, call: Call, response: aiohttp.ClientResponse, out: Responder, headers: Headers
    ) -> None:
        raw = await response.read()
        call.status = response.status
        call.upstream_latency_ms = call.elapsed_ms()
        if response.status == 200:
            call.usage, call.generated_text = response_usage(raw)
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
                    if account.inspect(event) or call.client_wants_usage:
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
            if rest.strip() and (account.inspect(rest) or call.client_wants_usage):
                await out.body(rest + b"\n\n", more=True)
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

    async def _fail(self, call: Call, out: Responder, headers: Headers, exc: GatewayError) -> None:
        call.status = exc.status
        call.error_type = exc.type if exc.code is None else str(exc.code)
        if out.started:
            await out.body(b"data: " + exc.body() + b"\n\n", more=False)
        else:
            await out.error(exc, headers)

    async def _settle(self, call: Call) -> None:
        usage, source = call.usage, "upstream"
        if usage is not None and call.prompt_count and usage.prompt_tokens != call.prompt_count:
            # Equal unless the chat template or tokenizer differs from the upstream's: the
            # admin's served-model list shows how often (reconciliation column).
            log.warning(
                "prompt count mismatch for %s: gateway %d, upstream %d (request %s)",
                call.model.name, call.prompt_count, usage.prompt_tokens, call.request_id,
            )  # fmt: skip
        if usage is None:
            completion = 0
            if call.generated_text:
                completion = await self.counters.count_completion(
                    call.grant.user_id, call.model, call.generated_text
                )
            produced = call.status == 200 or completion > 0
            usage = Usage(
                prompt_tokens=call.prompt_count if produced else 0, completion_tokens=completion
            )
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


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _error_type(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error.get("type") or "upstream_error")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "upstream_error"
