"""SGLang SIMULATOR: a stand-in for an SGLang server on machines without a GPU (not SGLang).

It is not a model and infers nothing. It speaks SGLang's wire format (OpenAI-compatible routes,
flat errors, native routes, Prometheus metrics with SGLang's names) and answers every request
with the same Korean paragraph, cut into single tokens of the served model's real tokenizer, at
a configurable speed. Prompt usage is counted with `tokenlimit.tokens.get_counter(model)`, the code
path the gateway uses, so `usage.prompt_tokens` is what SGLang would report for the same model.

Answer length (completion tokens):
- `x-sim-completion-tokens: N` (below): the "model" stops by itself after N tokens
  (finish_reason "stop", matched_stop = EOS id), unless max_tokens is smaller ("length");
- otherwise `max_tokens` / `max_completion_tokens` is generated in full ("length");
- otherwise chat answers stop after `--answer-tokens` (default 64, "stop") and completions after
  16 tokens ("length", SGLang's default max_tokens for /v1/completions).
Either way generation ends at the context length ("length").

Simulator-only test hooks. SGLang has none of these; each can be given as a request header or
as a key of a `sim` object in the JSON body (the body wins; it survives a gateway that forwards
the body but not the headers, and SGLang itself ignores unknown body fields):
- `x-sim-no-usage: 1` / `"sim": {"no_usage": true}`: behave like the llama.cpp server, ignore
  stream_options and send no usage at all in streams (non-streaming answers keep their usage);
- `x-sim-status: N` / `status`: answer HTTP N with a flat SGLang error body;
- `x-sim-delay-ms: N` / `delay_ms`: sleep N ms before answering;
- `x-sim-completion-tokens: N` / `completion_tokens`: generate exactly N tokens and stop;
- `x-sim-cached-tokens: N` / `cached_tokens`: report N prompt tokens as prefix-cache hits
  (`usage.prompt_tokens_details.cached_tokens`, `sglang:cached_tokens_total`);
- `x-sim-error-after-tokens: N` / `error_after_tokens`: after N tokens end a stream with a
  `data: {"error": …}` event (non-streaming: HTTP 500).

`--kind openai-generic` plays a plain OpenAI-compatible server instead (llama-cpp-python, say):
only `/v1/chat/completions`, `/v1/completions` and `/v1/models` answer (no `/health`, no
`/metrics`, no native routes), and streams carry no usage whatever the client asks.
`--chat-template FILE` renders prompts with another template than the tokenizer's, as a server
started with `--chat-template` does: usage then differs from a gateway counting with the
tokenizer's own template (what the gateway's tokenizer self-check must catch).

Simulator-only routes for tests: `GET /sim/last_request` (the last /v1 JSON body, as received),
`GET /sim/stats` (requests, aborted, prompt/completion tokens, running, peak_running since the
start or the last reset) and `POST /sim/reset`.

A client disconnect cancels the handler (aiohttp `handler_cancellation=True`), which is how SGLang
aborts generation; it is counted in `sglang:num_aborted_requests_total`. So is
`POST /abort_request {"rid": …}` for a request that passed its own `rid`.

The wire format (bodies, chunks, SSE, errors) is in `sglang_sim.wire`, the Prometheus metrics
in `sglang_sim.metrics`, the configuration and the request record in `sglang_sim.jobs`. `serve()`
runs it; `python -m sglang_sim` and `manage.py simulate_sglang` parse their options in
`sglang_sim.cli` and call it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from prometheus_client import generate_latest

from sglang_sim.engine import BatchEngine
from sglang_sim.jobs import Job, SimStats, SimulatorConfig, ThroughputMeter
from sglang_sim.metrics import SimMetrics
from sglang_sim.wire import (
    SSE_DONE,
    SSE_HEADERS,
    ChatWire,
    CompletionWire,
    SimError,
    json_response,
    simulated_failure,
    sse,
)
from tokenlimit.tokens import TokenCounter, TokenizerCounter, get_counter, sglang_template_kwargs

log = logging.getLogger(__name__)

SIMULATOR_VERSION = "0.0.0-simulator"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # SGLang's CompletionRequest.max_tokens default
# Cut into Qwen tokens, every prefix of this paragraph (and of its repetitions joined by a
# space) re-tokenizes to exactly the tokens generated, so a gateway counting the streamed text
# itself gets the same number as usage.completion_tokens.
ANSWER_PARAGRAPH = (
    "안녕하세요. 저는 한국어로 답변하는 시뮬레이터입니다. 오늘은 좋은 하루가 될 것입니다. "
    "이 문장은 같은 순서로 계속 반복됩니다. 질문이 있으면 언제든지 물어보세요. 감사합니다."
)


# --- The answer ---------------------------------------------------------------------------------


class AnswerTokens:
    """The simulator's answer as (text, tokens) pieces: one token each with a real tokenizer."""

    def __init__(self, counter: TokenCounter, paragraph: str = ANSWER_PARAGRAPH) -> None:
        if isinstance(counter, TokenizerCounter):
            self.first = _token_pieces(counter, paragraph)
            self.cycle = _token_pieces(counter, " " + paragraph)
        else:  # no tokenizer: one character a "token", as good as any guess
            self.first = [(ch, 1) for ch in paragraph]
            self.cycle = [(ch, 1) for ch in " " + paragraph]

    def pieces(self, tokens: int) -> list[tuple[str, int]]:
        """The first `tokens` tokens of the answer, as pieces whose token counts sum to it."""
        out: list[tuple[str, int]] = []
        left = tokens
        for text, n in itertools.chain(self.first, itertools.cycle(self.cycle)):
            if left <= 0:
                break
            out.append((text, min(n, left)))
            left -= n
        return out


def _token_pieces(counter: TokenizerCounter, text: str) -> list[tuple[str, int]]:
    pieces: list[tuple[str, int]] = []
    pending: list[int] = []
    for token_id in counter.encode(text):
        pending.append(token_id)
        piece = counter.decode(pending)
        # A token ending inside a multi-byte character decodes to U+FFFD; SGLang holds such
        # bytes back until the character is complete, so they travel with the next token.
        if "\ufffd" not in piece:
            pieces.append((piece, len(pending)))
            pending = []
    if pending:
        pieces.append((counter.decode(pending), len(pending)))
    return pieces


# --- Requests in flight -----------------------------------------------------------------------


@dataclass
class Hooks:
    """The simulator-only test hooks (see the module docstring)."""

    no_usage: bool = False
    status: int | None = None
    delay_ms: int = 0
    completion_tokens: int | None = None
    cached_tokens: int = 0
    error_after_tokens: int | None = None

    @classmethod
    def parse(cls, headers: Mapping[str, str], sim: Any) -> Hooks:
        """From the body's `sim` object, else from the `x-sim-…` headers."""
        given = sim if isinstance(sim, dict) else {}

        def raw(name: str) -> Any:
            return given[name] if name in given else headers.get("x-sim-" + name.replace("_", "-"))

        def number(name: str) -> int | None:
            value = raw(name)
            if value is None:
                return None
            if isinstance(value, bool) or not str(value).strip().isdigit():
                raise SimError(f"simulator hook {name} must be a whole number")
            return int(value)

        return cls(
            no_usage=str(raw("no_usage")).strip().lower() in ("1", "true", "yes"),
            status=number("status"),
            delay_ms=number("delay_ms") or 0,
            completion_tokens=number("completion_tokens"),
            cached_tokens=number("cached_tokens") or 0,
            error_after_tokens=number("error_after_tokens"),
        )

    def fails_after(self, generated: int) -> bool:
        return self.error_after_tokens is not None and generated >= self.error_after_tokens


class Simulator:
    """The engine: admits requests, paces tokens, keeps the numbers /metrics reports."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.counter = get_counter(
            config.model, config.tokenizer, chat_template=config.chat_template
        )
        self.answer = AnswerTokens(self.counter)
        tokenizer = getattr(self.counter, "tokenizer", None)
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None)
        self.running: dict[int, Job] = {}
        self.waiting = 0
        limit = config.max_running_requests
        self.engine = BatchEngine(config, self._prefilled) if config.engine == "gpu" else None
        self.slots = asyncio.Semaphore(limit) if limit and self.engine is None else None
        self.throughput = ThroughputMeter()
        self.metrics = SimMetrics(self)
        self._ids = itertools.count()
        self._prompt_total = self._cached_total = 0
        self.stats = SimStats()
        self.last_request: dict[str, Any] = {}

    def used_tokens(self) -> int:
        return sum(job.prompt_tokens + job.generated for job in self.running.values())

    def token_usage(self) -> float:
        return self.used_tokens() / self.config.max_total_tokens

    def cache_hit_rate(self) -> float:
        return self._cached_total / self._prompt_total if self._prompt_total else 0.0

    def matched_stop(self, job: Job) -> int | None:
        return self.eos_token_id if job.finish_reason == "stop" else None

    def abort(self, rid: str | None) -> int:
        """Flag running requests with this rid (None: all) to stop; returns how many."""
        hits = [job for job in self.running.values() if rid is None or job.rid == rid]
        for job in hits:
            job.abort_requested = True
        return len(hits)

    @asynccontextmanager
    async def admitted(self, job: Job) -> AsyncIterator[Job]:
        """Queue for a place in the batch, run, and account the request however it ends."""
        self.waiting += 1
        queued = True
        try:
            async with self._place(job):
                self.waiting -= 1
                queued = False
                self.metrics.queue_time.observe(time.monotonic() - job.started)
                key = next(self._ids)
                self.running[key] = job
                self.stats.peak_running = max(self.stats.peak_running, len(self.running))
                try:
                    yield job
                except (asyncio.CancelledError, ConnectionResetError):
                    job.finish_reason = "abort"  # the client went away mid-generation
                    raise
                finally:
                    del self.running[key]
                    self._finished(job)
        finally:
            if queued:
                self.waiting -= 1

    @asynccontextmanager
    async def _place(self, job: Job) -> AsyncIterator[None]:
        """The GPU-like engine's batch, or a slot of --max-running-requests (fixed engine)."""
        if self.engine is not None:
            async with self.engine.admitted(job):
                yield
            return
        if self.slots is None:
            yield
            return
        async with self.slots:
            yield

    def _finished(self, job: Job) -> None:
        self.metrics.requests.inc()
        self.metrics.e2e.observe(time.monotonic() - job.started)
        self.stats.requests += 1
        self.stats.completion_tokens += job.generated
        if job.finish_reason == "abort":
            self.stats.aborted += 1
            self.metrics.aborted.inc()
            log.info("request %s aborted after %d tokens", job.rid, job.generated)

    async def generate(self, job: Job) -> AsyncIterator[tuple[str, bool]]:
        """Yield (piece, is_last) at the engine's pace; finish_reason is set before the last."""
        pieces = self.answer.pieces(job.target)
        if not pieces:  # x-sim-completion-tokens: 0
            self._prefilled(job)
            job.finish_reason = "stop" if job.natural_stop else "length"
        last_at = time.monotonic()
        async for index, (text, tokens) in self._paced(job, pieces):
            if index:
                now = time.monotonic()
                self.metrics.itl.observe(now - last_at)
                last_at = now
            if job.abort_requested:  # POST /abort_request
                job.finish_reason = "abort"
                return
            job.generated += tokens
            self.metrics.generation_tokens.inc(tokens)
            self.throughput.tokens += tokens
            last = index == len(pieces) - 1
            if last:
                job.finish_reason = "stop" if job.natural_stop else "length"
            yield text, last

    async def _paced(
        self, job: Job, pieces: list[tuple[str, int]]
    ) -> AsyncIterator[tuple[int, tuple[str, int]]]:
        """The pieces, each when its last token exists: from the GPU-like engine's steps, or
        after the fixed time to first token and then at tokens_per_second."""
        if not pieces:
            return
        if self.engine is not None:
            index, owed = 0, 0
            async for new in self.engine.tokens(job):
                owed += new
                while index < len(pieces) and pieces[index][1] <= owed:
                    owed -= pieces[index][1]
                    yield index, pieces[index]
                    index += 1
            return
        if self.config.ttft_ms > 0:
            await asyncio.sleep(self.config.ttft_ms / 1000)
        self._prefilled(job)
        speed = self.config.tokens_per_second
        first_at = time.monotonic()
        for index, piece in enumerate(pieces):
            if speed and index:
                await asyncio.sleep(max(0.0, first_at + index / speed - time.monotonic()))
            yield index, piece

    def _prefilled(self, job: Job) -> None:
        self.metrics.ttft.observe(time.monotonic() - job.started)
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        self.metrics.cached_tokens.inc(job.cached_tokens)
        self._prompt_total += job.prompt_tokens
        self._cached_total += job.cached_tokens
        self.stats.prompt_tokens += job.prompt_tokens


# --- HTTP ---------------------------------------------------------------------------------------


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise SimError("Unsupported Media Type: Only 'application/json' is allowed")
    try:
        body = json.loads(await request.read())
    except ValueError as exc:
        raise SimError(f"JSON decode error: {exc}") from None
    if not isinstance(body, dict):
        raise SimError("Input should be a valid dictionary or object to extract fields from")
    return body


def positive_int(body: Mapping[str, Any], *names: str) -> int | None:
    """The first of `names` that is set, checked the way SGLang's validators check it."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SimError(f"{name} must be a positive integer")
        return value
    return None


def plan_answer(
    limit: int | None, natural: int | None, default: tuple[int, bool], room: int
) -> tuple[int, bool]:
    """(tokens to generate, whether the model stops by itself) for one request."""
    if natural is not None and (limit is None or natural <= limit):
        tokens, stops = natural, True
    elif limit is not None:
        tokens, stops = limit, False
    else:
        tokens, stops = default
    return (room, False) if tokens > room else (tokens, stops)


def context_error(prompt: int, limit: int | None, context: int) -> SimError | None:
    """SGLang's two context-length refusals (tokenizer_manager._validate_one_request)."""
    if prompt >= context:
        return SimError(
            f"The input ({prompt} tokens) is longer than the model's context length "
            f"({context} tokens)."
        )
    if limit is not None and prompt + limit >= context:
        return SimError(
            f"Requested token count exceeds the model's maximum context length of {context} "
            f"tokens. You requested a total of {prompt + limit} tokens: {prompt} tokens from the "
            f"input messages and {limit} tokens for the completion. Please reduce the number of "
            "tokens in the input messages or the completion to fit within the limit."
        )
    return None


class Api:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.chat_wire = ChatWire(sim)
        self.completion_wire = CompletionWire(sim)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            hooks, body = await self.prelude(request)
            prompt = self.count_chat(body)
            job = self.make_job(
                body, hooks, prompt, "chatcmpl", (self.sim.config.answer_tokens, True)
            )
        except SimError as exc:
            return exc.response()
        return await self.respond(request, job, hooks, self.chat_wire)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            hooks, body = await self.prelude(request)
            prompt = self.count_prompt(body.get("prompt"))
            default = (COMPLETIONS_DEFAULT_MAX_TOKENS, False)
            job = self.make_job(body, hooks, prompt, "cmpl", default)
        except SimError as exc:
            return exc.response()
        return await self.respond(request, job, hooks, self.completion_wire)

    async def prelude(self, request: web.Request) -> tuple[Hooks, dict[str, Any]]:
        body = await read_json(request)
        self.sim.last_request = body
        hooks = Hooks.parse(request.headers, body.get("sim"))
        if hooks.delay_ms:
            await asyncio.sleep(hooks.delay_ms / 1000)
        if hooks.status is not None and hooks.status >= 400:
            raise SimError(f"Simulated error (sim status {hooks.status})", hooks.status)
        self.check_model(body.get("model"))
        return hooks, body

    def check_model(self, name: Any) -> None:
        served = self.sim.config.model
        if name is not None and name not in ("default", served):
            raise SimError(
                f"The model `{name}` does not exist. The served model name is `{served}`."
            )

    def count_chat(self, body: Mapping[str, Any]) -> int:
        messages = body.get("messages")
        if messages is None:
            raise SimError("messages: Field required")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise SimError("messages: Input should be a valid list of message objects")
        if not messages:
            raise SimError("Messages cannot be empty.")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise SimError("chat_template_kwargs: Input should be a valid dictionary")
        kwargs = sglang_template_kwargs(body.get("reasoning_effort"), kwargs)
        tools, tool_choice = body.get("tools"), body.get("tool_choice")
        try:
            return self.sim.counter.count_chat(messages, tools, tool_choice=tool_choice, **kwargs)
        except Exception as exc:  # a template refusing the conversation is the client's 400
            raise SimError(str(exc) or type(exc).__name__) from None

    def prompt_ids(self, body: Mapping[str, Any]) -> tuple[int, ...]:
        """The prompt's token ids, for the GPU-like engine's prefix cache (only there: the
        fixed engine does not need them, and tokenizing twice costs)."""
        sim = self.sim
        if sim.engine is None or not sim.config.radix_cache:
            return ()
        counter = sim.counter
        try:
            if "messages" in body:
                if not isinstance(counter, TokenizerCounter) or counter.chat_fallback is not None:
                    return ()
                kwargs = sglang_template_kwargs(
                    body.get("reasoning_effort"), body.get("chat_template_kwargs") or {}
                )
                return tuple(counter.encode_chat(
                    body["messages"], body.get("tools"), tool_choice=body.get("tool_choice"),
                    **kwargs,
                ))  # fmt: skip
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list):
                return tuple(t for t in prompt if isinstance(t, int))
            return tuple(counter.encode(prompt)) if isinstance(prompt, str) else ()
        except Exception:  # counted already; no ids only means no cache hit
            return ()

    def count_prompt(self, prompt: Any) -> int:
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.sim.counter.count_text(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if prompt is None:
            raise SimError("prompt: Field required")
        raise SimError("The simulator takes one prompt per request (a string or token ids).")

    def make_job(
        self,
        body: Mapping[str, Any],
        hooks: Hooks,
        prompt: int,
        prefix: str,
        default: tuple[int, bool],
    ) -> Job:
        context = self.sim.config.context_length
        limit = positive_int(body, "max_completion_tokens", "max_tokens")
        refusal = context_error(prompt, limit, context)
        if refusal is not None:
            raise refusal
        target, stops = plan_answer(limit, hooks.completion_tokens, default, context - prompt)
        stream = body.get("stream") is True
        # A generic OpenAI-compatible server (llama-cpp-python) ignores stream_options.
        usage_in_streams = not hooks.no_usage and self.sim.config.kind == "sglang"
        options = body.get("stream_options") if stream and usage_in_streams else None
        options = options if isinstance(options, dict) else {}
        rid = body.get("rid")
        priority = body.get("priority", 0)
        if priority is None:
            priority = 0
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise SimError("priority: Input should be a valid integer")
        return Job(
            rid=rid if isinstance(rid, str) and rid else f"{prefix}-{uuid.uuid4().hex}",
            model=str(body.get("model") or "default"),
            prompt_tokens=prompt,
            target=target,
            natural_stop=stops,
            stream=stream,
            include_usage=bool(options.get("include_usage")),
            continuous_usage=bool(options.get("continuous_usage_stats")),
            cached_tokens=min(hooks.cached_tokens, prompt),
            priority=priority,
            prompt_ids=self.prompt_ids(body),
        )

    async def respond(
        self, request: web.Request, job: Job, hooks: Hooks, wire: ChatWire | CompletionWire
    ) -> web.StreamResponse:
        try:
            return await self._respond(request, job, hooks, wire)
        except SimError as exc:  # refused by the engine before anything was sent (queue full)
            return exc.response()

    async def _respond(
        self, request: web.Request, job: Job, hooks: Hooks, wire: ChatWire | CompletionWire
    ) -> web.StreamResponse:
        if not job.stream:
            return await self.respond_whole(job, hooks, wire)
        response = web.StreamResponse(headers=SSE_HEADERS)
        async with self.sim.admitted(job):
            async for text, last in self.sim.generate(job):
                if not response.prepared:  # like SGLang: the 200 leaves with the first token
                    await self.open_stream(request, response, wire.opening(job))
                await response.write(wire.piece(job, text, last))
                if hooks.fails_after(job.generated):
                    job.finish_reason = "error"
                    await response.write(sse({"error": simulated_failure().payload()}) + SSE_DONE)
                    return response
            if not response.prepared:
                await self.open_stream(request, response, wire.opening(job))
            await response.write(b"".join(wire.closing(job)) + SSE_DONE)
        return response

    async def open_stream(
        self, request: web.Request, response: web.StreamResponse, opening: list[bytes]
    ) -> None:
        await response.prepare(request)
        if opening:
            await response.write(b"".join(opening))

    async def respond_whole(
        self, job: Job, hooks: Hooks, wire: ChatWire | CompletionWire
    ) -> web.Response:
        parts: list[str] = []
        async with self.sim.admitted(job):
            async for text, _ in self.sim.generate(job):
                parts.append(text)
                if hooks.fails_after(job.generated):
                    job.finish_reason = "error"
                    return simulated_failure().response()
        return json_response(wire.body(job, "".join(parts)))

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self.model_card()]})

    def model_card(self) -> dict[str, Any]:
        config = self.sim.config
        return {
            "id": config.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sglang" if config.kind == "sglang" else "owner",
            "root": config.model,
            "parent": None,
            "max_model_len": config.context_length,
        }

    async def server_info(self, request: web.Request) -> web.Response:
        return json_response(server_info(self.sim))

    async def load(self, request: web.Request) -> web.Response:
        sim = self.sim
        load = {
            "dp_rank": 0,
            "num_reqs": len(sim.running) + sim.waiting,
            "num_waiting_reqs": sim.waiting,
            "num_tokens": sim.used_tokens(),
        }
        return json_response([load])

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.sim.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def abort_request(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
        except SimError as exc:
            return exc.response()
        rid = body.get("rid")
        self.sim.stats.abort_requests += 1
        flagged = self.sim.abort(None if body.get("abort_all") else str(rid))
        log.info("abort_request %s: %d running request(s) flagged", rid, flagged)
        return web.Response(status=200)

    async def sim_last_request(self, request: web.Request) -> web.Response:
        return json_response(self.sim.last_request)

    async def sim_stats(self, request: web.Request) -> web.Response:
        stats = dataclasses.asdict(self.sim.stats)
        engine = self.sim.engine
        # The GPU-like engine's forward passes since it started (not reset): what a batch costs.
        steps = {"steps": engine.steps} if engine is not None else {}
        return json_response({**stats, "running": len(self.sim.running), **steps})

    async def sim_reset(self, request: web.Request) -> web.Response:
        self.sim.stats = SimStats(peak_running=len(self.sim.running))
        self.sim.last_request = {}
        return json_response({})

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            self.check_model(body.get("model"))
            return json_response(self.tokenized(body))
        except SimError as exc:
            return exc.response()

    def tokenized(self, body: Mapping[str, Any]) -> dict[str, Any]:
        counter, context = self.sim.counter, self.sim.config.context_length
        if not isinstance(counter, TokenizerCounter):
            raise SimError(f"No tokenizer loaded ({counter.source}); cannot tokenize.")
        if (body.get("prompt") is None) == (body.get("messages") is None):
            raise SimError("Exactly one of 'prompt' or 'messages' must be provided.")
        if body.get("messages") is not None:
            kwargs = sglang_template_kwargs(
                body.get("reasoning_effort"), body.get("chat_template_kwargs")
            )
            tools, tool_choice = body.get("tools"), body.get("tool_choice")
            try:
                ids = counter.encode_chat(
                    body["messages"], tools, tool_choice=tool_choice, **kwargs
                )
            except Exception as exc:
                raise SimError(str(exc) or type(exc).__name__) from None
            return {"tokens": ids, "count": len(ids), "max_model_len": context}
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise SimError("The simulator tokenizes one prompt string per request.")
        special = body.get("add_special_tokens", True) is not False
        ids = list(counter.tokenizer.encode(prompt, add_special_tokens=special))
        return {"tokens": ids, "count": len(ids), "max_model_len": context}


def server_info(sim: Simulator) -> dict[str, Any]:
    """Plausible SGLang server args, flattened, plus the fields SGLang adds to them."""
    config = sim.config
    running = config.max_running_requests or None
    return {
        "model_path": config.model,
        "tokenizer_path": sim.counter.source,
        "served_model_name": config.model,
        "context_length": config.context_length,
        "max_total_tokens": config.max_total_tokens,
        "max_running_requests": running,
        "tp_size": 1,
        "schedule_policy": "fcfs",
        "enable_metrics": True,
        "enable_cache_report": True,
        "simulator": {"tokens_per_second": config.tokens_per_second, "ttft_ms": config.ttft_ms},
        "max_total_num_tokens": config.max_total_tokens,
        "max_req_input_len": config.context_length - 1,
        "version": SIMULATOR_VERSION,
        "internal_states": [
            {
                "last_gen_throughput": sim.throughput.rate(),
                "effective_max_running_requests_per_dp": running,
            }
        ],
    }


SIMULATOR_KEY = web.AppKey("simulator", Simulator)


def build_app(config: SimulatorConfig) -> web.Application:
    """The simulator as an aiohttp app; loads the tokenizer now, not on the first request."""
    sim = Simulator(config)
    # Compiles the chat template and warms the tokenizer before the first timed request.
    sim.counter.count_chat([{"role": "user", "content": "안녕하세요"}])
    api = Api(sim)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIMULATOR_KEY] = sim
    routes = [
        web.post("/v1/chat/completions", api.chat_completions),
        web.post("/v1/completions", api.completions),
        web.get("/v1/models", api.models),
    ]
    if config.kind == "sglang":
        routes += [web.get("/metrics", api.metrics), web.post("/abort_request", api.abort_request)]
        routes += [web.get(path, api.health) for path in ("/health", "/health_generate")]
        routes += [web.get(path, api.server_info) for path in ("/get_server_info", "/server_info")]
        routes += [web.get("/get_load", api.load), web.get("/v1/loads", api.load)]
        routes += [web.post(path, api.tokenize) for path in ("/v1/tokenize", "/tokenize")]
    routes += [web.get("/sim/last_request", api.sim_last_request)]
    routes += [web.get("/sim/stats", api.sim_stats), web.post("/sim/reset", api.sim_reset)]
    app.add_routes(routes)
    return app


def serve(config: SimulatorConfig, host: str, port: int) -> None:
    """Run the simulator on host:port until the process is stopped."""
    app = build_app(config)
    log.info(
        "SGLang SIMULATOR (no model, no GPU: a canned Korean answer) playing %s for %s on "
        "http://%s:%d; %s tokens/s, TTFT %s ms, context %d, counting with %s%s",
        config.kind,
        config.model,
        host,
        port,
        config.tokens_per_second or "unlimited",
        config.ttft_ms,
        config.context_length,
        app[SIMULATOR_KEY].counter.source,
        " and its own chat template" if config.chat_template else "",
    )
    # handler_cancellation: a client disconnect cancels the handler, which aborts generation
    # the way SGLang aborts on disconnect. A short shutdown_timeout: streams may be mid-answer.
    web.run_app(
        app,
        host=host,
        port=port,
        handler_cancellation=True,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
    )
