"""A request made ready for admission and the relay: checked, counted, reserved, rebuilt.

`prepare` runs on a worker thread (gateway/counting.py) and does all of a request's CPU work at
once: the field checks, the chat template and the tokenizer, the reservation, and the body the
upstream receives. That body is built from checked fields only, plus what the gateway itself
decides: the served model name, the adapter, its own request id as SGLang's `rid`, the plan's
`priority` and `cache_salt`, a `max_tokens` when the client set none, and usage always asked
for in streams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings

from gateway.errors import invalid
from gateway.request_schema import CHAT, Context, ValidRequest, validate
from quotas.request_policy import RequestAccess
from tokenlimit.chat_templates import TemplateBudgetExceeded
from tokenlimit.limiter import COMPLETIONS_DEFAULT_MAX_TOKENS, CompletionBudget, completion_budget
from tokenlimit.tokens import TokenCounter, TokenizerCounter, sglang_template_kwargs

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    model: str  # the name the upstream serves
    adapter: str | None  # a LoRA adapter of that model, already checked
    request_id: str
    access: RequestAccess


@dataclass(slots=True)
class Prepared:
    valid: ValidRequest
    prompt_tokens: int
    budget: CompletionBudget
    upstream_body: bytes
    target: UpstreamTarget

    def flexible_floor(self, least_completion: int) -> int:
        """For a request without a maximum (the gateway picks max_tokens): the least the
        limiter may reserve, the prompt plus `least_completion` tokens a choice (min_tokens if
        more, never more than the default); 0 when the client set its maximum."""
        budget = self.budget
        if budget.forced_max is None:
            return 0
        least = min(max(self.valid.min_tokens, least_completion, 1), budget.per_choice)
        return self.prompt_tokens + self.valid.choices * least

    def per_choice_within(self, reserved: int) -> int:
        """max_tokens a choice gets from a reservation smaller than the budget."""
        return max((reserved - self.prompt_tokens) // max(self.valid.choices, 1), 1)


def prepare(
    endpoint: str,
    data: dict[str, Any],
    ctx: Context,
    counter: TokenCounter,
    context_length: int,
    target: UpstreamTarget,
    prompt_offset: int = 0,
) -> Prepared:
    valid = validate(endpoint, data, ctx)
    prompt = count_prompt(counter, endpoint, valid.fields)
    if endpoint == CHAT and prompt and counter.chat_exact:
        # The model's known difference from its upstream's count (gateway/self_check.py).
        prompt = max(prompt + prompt_offset, 0)
    default_max = (
        settings.LIMITER_DEFAULT_MAX_TOKENS if endpoint == CHAT else COMPLETIONS_DEFAULT_MAX_TOKENS
    )
    budget = completion_budget(
        prompt,
        choices=valid.choices,
        max_tokens=valid.max_tokens,
        min_tokens=valid.min_tokens,
        context_length=context_length,
        default_max=default_max,
    )
    return Prepared(valid, prompt, budget, upstream_body(valid, target, budget.forced_max), target)


def upstream_body(valid: ValidRequest, target: UpstreamTarget, forced_max: int | None) -> bytes:
    body: dict[str, Any] = {"model": target.model, **valid.fields}
    if target.adapter is not None:
        body["lora_path"] = target.adapter
    if forced_max is not None:
        body["max_tokens"] = forced_max
    if valid.stream:
        # Settlement needs the usage; the relay hides the usage chunk if the client did not ask.
        body["stream_options"] = {**valid.fields.get("stream_options", {}), "include_usage": True}
    else:
        body.pop("stream_options", None)
    body["rid"] = target.request_id
    if target.access.priority is not None:
        body["priority"] = target.access.priority
    if target.access.cache_salt is not None:
        body["cache_salt"] = target.access.cache_salt
    return orjson.dumps(body)


def count_prompt(counter: TokenCounter, endpoint: str, fields: dict[str, Any]) -> int:
    try:
        if endpoint == CHAT:
            return counter.count_chat(
                fields["messages"],
                fields.get("tools"),
                tool_choice=fields.get("tool_choice"),
                **template_kwargs(fields),
            )
        return _count_prompt_field(counter, fields["prompt"])
    except TemplateBudgetExceeded:
        raise  # the caller decides: a larger budget, or a 400 (gateway/counting.py)
    except Exception:
        # A template that cannot render this conversation will fail upstream too; the
        # upstream's own usage then decides what is billed.
        log.warning("could not count the prompt with %s", counter.source, exc_info=True)
        return 0


def template_kwargs(fields: dict[str, Any]) -> dict[str, Any]:
    return sglang_template_kwargs(
        fields.get("reasoning_effort"), fields.get("chat_template_kwargs")
    )


def _count_prompt_field(counter: TokenCounter, prompt: Any) -> int:
    if isinstance(prompt, str):
        return counter.count_text(prompt)
    if prompt and all(isinstance(p, int) for p in prompt):
        return len(prompt)  # already token ids
    return sum(counter.count_text(p) if isinstance(p, str) else len(p) for p in prompt)


def tokenize(counter: TokenCounter, fields: dict[str, Any], context_length: int) -> dict[str, Any]:
    """`POST /v1/tokenize` in SGLang's shape; estimated counts (no tokenizer) say so."""
    messages = fields.get("messages")
    tokens: list[int] = []
    # A chat is estimated without a tokenizer, and with one that has no chat template.
    estimated = not counter.exact or (messages is not None and not counter.chat_exact)
    try:
        if estimated:
            count = (
                counter.count_chat(messages, fields.get("tools"))
                if messages is not None
                else counter.count_text(fields["prompt"])
            )
        elif messages is not None and isinstance(counter, TokenizerCounter):
            tokens = counter.encode_chat(
                messages,
                fields.get("tools"),
                tool_choice=fields.get("tool_choice"),
                **template_kwargs(fields),
            )
            count = len(tokens)
        else:
            special = fields.get("add_special_tokens", True)
            tokens = counter.encode(fields["prompt"], add_special_tokens=special)
            count = len(tokens)
    except ValueError as exc:  # the chat template refused this conversation
        raise invalid(f"The chat template cannot render these messages: {exc}") from None
    result: dict[str, Any] = {"tokens": tokens, "count": count, "max_model_len": context_length}
    if estimated:
        result["estimated"] = True
    return result
