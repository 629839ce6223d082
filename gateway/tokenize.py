"""`POST /v1/tokenize`: what a prompt will cost, before it is sent (authenticated, not charged).

SGLang's shape: `{model, prompt}` or `{model, messages[, tools]}` → `{tokens, count,
max_model_len}`. For a model without a tokenizer the count is the estimator's, `tokens` is
empty and `estimated` is true.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.caches import ModelInfo
from gateway.counting import INLINE_COUNT_MAX_BYTES, Counters, token_executor
from gateway.errors import invalid
from gateway.validation import validate_chat
from quotas.tokens import TokenCounter, TokenizerCounter


def check_tokenize_body(data: dict[str, Any]) -> None:
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if has_prompt == has_messages:
        raise invalid("Send exactly one of 'prompt' or 'messages'.", param="prompt")
    if has_messages:
        validate_chat(data)
    elif not isinstance(data["prompt"], str):
        raise invalid("'prompt' must be a string.", param="prompt")


async def tokenize(
    counters: Counters, model: ModelInfo, data: dict[str, Any], size: int
) -> dict[str, Any]:
    counter = await counters.get(model)
    if size <= INLINE_COUNT_MAX_BYTES:
        tokens, count = _tokenize(counter, data)
    else:
        loop = asyncio.get_running_loop()
        tokens, count = await loop.run_in_executor(token_executor, _tokenize, counter, data)
    result: dict[str, Any] = {
        "tokens": tokens,
        "count": count,
        "max_model_len": model.context_length,
    }
    if not counter.exact:
        result["estimated"] = True
    return result


def _tokenize(counter: TokenCounter, data: dict[str, Any]) -> tuple[list[int], int]:
    messages = data.get("messages")
    if isinstance(counter, TokenizerCounter):
        try:
            if messages is not None:
                kwargs = data.get("chat_template_kwargs")
                tokens = counter.encode_chat(
                    messages,
                    data.get("tools"),
                    tool_choice=data.get("tool_choice"),
                    **(kwargs if isinstance(kwargs, dict) else {}),
                )
            else:
                tokens = counter.encode(data["prompt"])
        except ValueError as exc:  # the chat template refused this conversation
            raise invalid(f"The chat template cannot render these messages: {exc}") from None
        return tokens, len(tokens)
    if messages is not None:
        return [], counter.count_chat(messages, data.get("tools"))
    return [], counter.count_text(data["prompt"])
