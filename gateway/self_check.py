"""The tokenizer self-check: does the gateway count prompts as the upstream does?

A gateway and a model server can disagree without anyone noticing: the bundled Qwen tokenizer
files carry the Qwen3 chat template while a Qwen2.5-Instruct server renders Qwen2.5's, which
adds a default system prompt to every chat that has none (about 20 tokens a request). The
gateway reserves and limits with its own count, so the difference goes unseen until the
reconciliation says so days later.

So each gateway sends a few probe conversations (Korean; with and without a system prompt; with
a tool) to each model's upstream with `max_tokens: 1` and compares `usage.prompt_tokens` with its
own count (plus the model's prompt_token_offset): at start-up once the tokenizer is loaded,
whenever a model's counting settings change (the catalog reloads every few seconds), and every
GATEWAY_SELF_CHECK_SECONDS. Outcomes: "ok" (all equal), "mismatch" (the offset seen when every
probe differs by the same number, else none), "estimated" (no tokenizer: the estimator cannot
be exact, the differences are reported), "failed" (no usable answer). Each result is a
TokenizerCheck row (the admin's model list shows the latest) and part of /health/ready.

When the operator set `correct_offset_automatically` and the difference is constant, the
offset is added to the model's prompt_token_offset (an audited change; a conditional update, so
that N gateways finding the same offset apply it once). Otherwise the operator decides: fix the
tokenizer or chat template, or accept the offset.

Probes cost the upstream a few prompts of prefill and one token each; they are not billed to
anyone and not in the usage ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from django.conf import settings

from gateway.caches import MODEL_FIELDS, ModelInfo, model_info, run_db
from gateway.counting import Counters, counter_for, counting_key
from gateway.upstream import Upstream
from tokenlimit.tokens import TokenCounter

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 30.0
RETRY_FAILED_SECONDS = 60.0
_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "도시의 현재 날씨를 알려 줍니다.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "도시 이름"}},
            "required": ["city"],
        },
    },
}
# (name, messages, tools): what Korean services send; the first has no system prompt, which is
# where templates that add a default one differ.
PROBES: tuple[tuple[str, list[dict[str, str]], list[dict[str, Any]] | None], ...] = (
    (
        "korean",
        [{"role": "user", "content": "대한민국의 수도는 어디인가요? 한 문장으로 답해 주세요."}],
        None,
    ),
    (
        "korean_system",
        [
            {"role": "system", "content": "당신은 친절한 한국어 상담원입니다. 존댓말로 답하세요."},
            {"role": "user", "content": "서울에서 꼭 먹어 봐야 할 음식을 세 가지 추천해 주세요."},
        ],
        None,
    ),
    (
        "tools",
        [{"role": "user", "content": "오늘 부산 날씨는 어때요?"}],
        [_WEATHER_TOOL],
    ),
)


@dataclass
class CheckResult:
    model: str
    outcome: str  # "ok" | "mismatch" | "estimated" | "failed"
    counter_source: str
    offset_seen: int | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""
    checked_at: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        """What /health/ready shows of it."""
        return {
            "outcome": self.outcome,
            "offset_seen": self.offset_seen,
            "detail": self.detail,
            "checked_seconds_ago": round(time.time() - self.checked_at, 1),
        }


def verdict(
    model: str, counter: TokenCounter, probes: list[dict[str, Any]], offset: int
) -> CheckResult:
    """The outcome of probes that each have "gateway" (own count, offset included) and
    "upstream" (usage.prompt_tokens, None if the probe got no usable answer)."""
    answered = [p for p in probes if p["upstream"] is not None]
    result = CheckResult(model, "failed", counter.source, probes=probes)
    if not answered:
        errors = "; ".join(str(p.get("error", "")) for p in probes if p.get("error"))
        result.detail = f"no probe got usage from the upstream: {errors}"[:500]
        return result
    gaps = sorted({p["upstream"] - p["gateway"] for p in answered})
    skipped = [p["name"] for p in probes if p["upstream"] is None]
    note = f" ({', '.join(skipped)} not answered)" if skipped else ""
    if not counter.chat_exact:
        result.outcome = "estimated"
        result.detail = f"no tokenizer: estimated counts differ by {gaps}{note}"[:500]
    elif gaps == [0]:
        result.outcome = "ok"
        result.detail = f"{len(answered)} probes equal{note}"
    elif len(gaps) == 1:
        result.outcome, result.offset_seen = "mismatch", gaps[0]
        result.detail = (
            f"the upstream counts {gaps[0]:+d} tokens on every probe (offset in use: {offset}): "
            f"a different chat template (a default system prompt?){note}"
        )[:500]
    else:
        result.outcome = "mismatch"
        result.detail = (
            f"the upstream's counts differ by {gaps} (offset in use: {offset}): a different "
            f"tokenizer or chat template{note}"
        )[:500]
    return result


async def probe_upstream(
    session: aiohttp.ClientSession,
    model: ModelInfo,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
) -> int:
    """usage.prompt_tokens of one probe; raises with a short reason when there is none."""
    body: dict[str, Any] = {
        "model": model.name,
        "messages": list(messages),
        "max_tokens": 1,
        "temperature": 0,
        "stream": False,
    }
    if tools:
        body["tools"] = list(tools)
    timeout = aiohttp.ClientTimeout(total=min(model.request_timeout, PROBE_TIMEOUT_SECONDS))
    url = f"{model.upstream_url}/v1/chat/completions"
    async with session.post(url, json=body, timeout=timeout) as response:
        payload = await response.json(content_type=None)
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
    usage = payload.get("usage") if isinstance(payload, dict) else None
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt <= 0:
        raise RuntimeError("no usage.prompt_tokens in the answer")
    return prompt


async def check_model(
    session: aiohttp.ClientSession, model: ModelInfo, counter: TokenCounter
) -> CheckResult:
    offset = model.prompt_token_offset if counter.chat_exact else 0
    probes: list[dict[str, Any]] = []
    for name, messages, tools in PROBES:
        own = await asyncio.to_thread(counter.count_chat, messages, tools)
        probe: dict[str, Any] = {"name": name, "gateway": own + offset, "upstream": None}
        try:
            probe["upstream"] = await probe_upstream(session, model, messages, tools)
        except Exception as exc:
            probe["error"] = f"{type(exc).__name__}: {exc}"[:200]
        probes.append(probe)
    return verdict(model.name, counter, probes, offset)


def signature(model: ModelInfo) -> tuple[Any, ...]:
    """What a check's result depends on: a change means check again."""
    return (
        *counting_key(model), model.prompt_token_offset, model.upstream_url,
        model.correct_offset_automatically,
    )  # fmt: skip


class SelfChecker:
    """Runs the checks for this gateway and keeps the latest result per model."""

    def __init__(
        self,
        counters: Counters,
        upstream: Upstream,
        record: Callable[[CheckResult, ModelInfo], Awaitable[None]] | None = None,
    ) -> None:
        self.counters = counters
        self.upstream = upstream
        self.results: dict[str, CheckResult] = {}
        self._checked: dict[str, tuple[Any, ...]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}
        self._record = record or record_result

    def on_catalog(self, models: tuple[ModelInfo, ...]) -> None:
        """Called on every catalog load (inside the event loop): check what changed."""
        if not settings.GATEWAY_SELF_CHECK:
            return
        now = time.monotonic()
        for model in models:
            changed = self._checked.get(model.name) != signature(model)
            if changed or self._retry_at.get(model.name, float("inf")) <= now:
                self.schedule(model)

    def due(self, models: tuple[ModelInfo, ...]) -> None:
        """The periodic re-check of every model."""
        for model in models:
            self.schedule(model)

    def schedule(self, model: ModelInfo) -> None:
        running = self._running.get(model.name)
        if running is not None and not running.done():
            return
        self._checked[model.name] = signature(model)
        self._retry_at.pop(model.name, None)
        self._running[model.name] = asyncio.ensure_future(self.run(model))

    async def run(self, model: ModelInfo) -> None:
        try:
            counter = await self.counters.get(model)  # waits for the tokenizer to load
            result = await check_model(self.upstream.session(), model, counter)
            self.results[model.name] = result
            if result.outcome in ("mismatch", "failed"):
                log.warning("tokenizer self-check for %s: %s", model.name, result.detail)
            if result.outcome == "failed":
                # The upstream was not answering (starting, down): try again soon, not in an hour.
                self._retry_at[model.name] = time.monotonic() + RETRY_FAILED_SECONDS
            await self._record(result, model)
        except Exception:
            log.exception("tokenizer self-check for %s failed", model.name)


async def record_result(result: CheckResult, model: ModelInfo) -> None:
    from gateway import services

    await run_db(services.record_tokenizer_check, result, model)


def check_now(served: Any) -> CheckResult:
    """One check of a ServedModel from outside the gateway (the admin's action): this
    process's own counter for it, probes sent from here, the result recorded like a
    gateway's."""
    from gateway.models import ServedModel
    from gateway.services import record_tokenizer_check

    values = ServedModel.objects.filter(pk=served.pk).values(*MODEL_FIELDS).get()
    model = model_info(values, settings.SGLANG_URL)
    counter = counter_for(model)

    async def probe() -> CheckResult:
        async with aiohttp.ClientSession() as session:
            return await check_model(session, model, counter)

    result = asyncio.run(probe())
    record_tokenizer_check(result, model)
    return result
