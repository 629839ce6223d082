"""Checks on a client's request body before anything is counted, reserved or sent upstream.

Only what the gateway itself needs is checked (shape, model, token limits); every other
OpenAI/SGLang parameter passes through untouched for SGLang to judge.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import GatewayError, invalid

MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise invalid("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    return data


def require_model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("You must provide a model parameter.", param="model", code="missing_model")
    return model


def validate_chat(data: dict[str, Any]) -> None:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid(
            "'messages' must be a non-empty list of message objects.",
            param="messages",
            code="invalid_messages",
        )
    for index, message in enumerate(messages):
        _validate_message(index, message)
    _validate_optional_tokens(data, "max_tokens")
    _validate_optional_tokens(data, "max_completion_tokens")
    _validate_stream_options(data)


def validate_completion(data: dict[str, Any]) -> None:
    prompt = data.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_prompt_list(prompt)):
        pass
    else:
        raise invalid(
            "'prompt' must be a string, a list of strings or a list of token ids.",
            param="prompt",
            code="invalid_prompt",
        )
    _validate_optional_tokens(data, "max_tokens")
    _validate_stream_options(data)


def _is_prompt_list(prompt: list[Any]) -> bool:
    if all(isinstance(p, str) for p in prompt):
        return True
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return True
    return all(
        isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        for p in prompt
    )


def _validate_message(index: int, message: Any) -> None:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"{param} must be an object with 'role' and 'content'.", param=param)
    role = message.get("role")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        raise invalid(
            f"{param}.role must be one of {', '.join(sorted(MESSAGE_ROLES))}; got {role!r}.",
            param=f"{param}.role",
        )
    content = message.get("content")
    if content is None:
        # An assistant turn that only calls tools has no content.
        if role == "assistant" and ("tool_calls" in message or "function_call" in message):
            return
        raise invalid(f"{param}.content is required.", param=f"{param}.content")
    if isinstance(content, str):
        return
    if isinstance(content, list) and all(_is_content_part(p) for p in content):
        return
    raise invalid(
        f"{param}.content must be a string or a list of content parts with a 'type'.",
        param=f"{param}.content",
    )


def _is_content_part(part: Any) -> bool:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        return False
    return part["type"] != "text" or isinstance(part.get("text"), str)


def _validate_optional_tokens(data: dict[str, Any], field: str) -> None:
    value = data.get(field)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid(f"'{field}' must be a positive integer; got {value!r}.", param=field)


def _validate_stream_options(data: dict[str, Any]) -> None:
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid(f"'stream' must be true or false; got {stream!r}.", param="stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object.", param="stream_options")


def payload_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than the gateway's limit of {limit} bytes.",
        code="request_too_large",
    )
