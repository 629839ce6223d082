"""The request fields the gateway accepts: an allowlist, checked field by field.

Followed: SGLang's request models (python/sglang/srt/entrypoints/openai/protocol.py,
`ChatCompletionRequest`, `CompletionRequest`, `TokenizeRequest`, read at commit 004c82e0) and
OpenAI's documented ranges. Accepted are the OpenAI parameters SGLang supports and a few safe
SGLang sampling extensions (SAFE_SGLANG_* below); a plan may enable more
(quotas/request_policy.py). A field nobody allowed is refused with a 400 naming it, so a typo is
seen rather than silently dropped. What is forwarded is rebuilt from checked values only, down
to each message and content part: the upstream never sees a key the gateway did not check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import GatewayError, invalid
from gateway.request_checks import (
    INT32_MAX,
    Check,
    array,
    boolean,
    field_error,
    function_name,
    integer,
    json_object,
    json_text_object,
    json_value,
    known_keys,
    number,
    obj,
    one_of,
    string_or_strings,
    text,
    token_id,
    unknown_parameter,
)
from quotas.request_policy import GATEWAY_OWNED_FIELDS, OPERATOR_EXTENSIONS

CHAT = "chat/completions"
COMPLETIONS = "completions"
TOKENIZE = "tokenize"

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# What the OpenAI SDK puts in a replayed response message: accepted, never forwarded.
REPLAYED_MESSAGE_KEYS = frozenset({"refusal", "annotations", "audio", "function_call"})
MEDIA_PARTS = ("image_url", "video_url", "audio_url")
MEDIA_URL_SCHEMES = ("http://", "https://", "data:")
# SGLang's accepted efforts (ReasoningEffortTier); its float form is not accepted here.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# Template variables a client may set. Everything else (chat_template, tokenize, …) would let a
# client run its own template or change how the operator's renders.
TEMPLATE_KWARGS: dict[str, Check] = {
    "enable_thinking": boolean,
    "thinking": boolean,
    "reasoning_effort": one_of(REASONING_EFFORTS),
}
MAX_TOOLS = 128
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1000
MAX_LOGIT_BIAS = 1024
MAX_BATCH_PROMPTS = 128
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_NAME_CHARS = 256


@dataclass(frozen=True, slots=True)
class Context:
    """What a check needs beyond the value: the served model's and the plan's facts."""

    vocab_size: int | None = None
    accepts_media: bool = False
    max_choices: int = 8
    extra_fields: frozenset[str] = frozenset()


FieldCheck = Callable[[Any, str, Context], Any]


def _plain(check: Check) -> FieldCheck:
    return lambda value, param, ctx: check(value, param)


# --- Messages ----------------------------------------------------------------------------------


def messages(value: Any, param: str, ctx: Context) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise field_error(param, "expected a non-empty array of message objects.")
    return [_message(item, f"{param}[{index}]", ctx) for index, item in enumerate(value)]


def _message(value: Any, param: str, ctx: Context) -> dict[str, Any]:
    message = obj(value, param)
    role = message.get("role")
    if role not in ROLES:
        raise field_error(f"{param}.role", f"expected one of {', '.join(ROLES)}.")
    out: dict[str, Any] = {"role": role}
    for key, item in message.items():
        if key == "role" or item is None or key in REPLAYED_MESSAGE_KEYS:
            continue
        where = f"{param}.{key}"
        if key == "content":
            out[key] = _content(item, where, ctx)
        elif key in ("name", "tool_call_id"):
            out[key] = text(MAX_NAME_CHARS)(item, where)
        elif key == "reasoning_content":
            out[key] = text(INT32_MAX)(item, where)
        elif key == "tool_calls" and role == "assistant":
            out[key] = _tool_calls(item, where)
        else:
            raise unknown_parameter(where)
    if role == "user" and "content" not in out:
        raise field_error(f"{param}.content", "a user message needs content.")
    return out


def _content(value: Any, param: str, ctx: Context) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise field_error(param, "expected a string or a non-empty array of content parts.")
    return [_part(part, f"{param}[{index}]", ctx) for index, part in enumerate(value)]


def _part(value: Any, param: str, ctx: Context) -> dict[str, Any]:
    part = obj(value, param)
    kind = part.get("type")
    if kind == "text":
        known_keys(part, ("type", "text"), param)
        return {"type": "text", "text": text(INT32_MAX)(part.get("text"), f"{param}.text")}
    if kind not in MEDIA_PARTS:
        allowed = ", ".join(("text", *MEDIA_PARTS))
        raise field_error(f"{param}.type", f"expected one of {allowed}.")
    if not ctx.accepts_media:
        raise invalid(
            f"This model does not accept {kind} content ({param}).",
            param=param,
            code="media_not_supported",
        )
    known_keys(part, ("type", kind), param)
    media = obj(part.get(kind), f"{param}.{kind}")
    known_keys(media, ("url", "detail") if kind == "image_url" else ("url",), f"{param}.{kind}")
    url = text(INT32_MAX, allow_empty=False)(media.get("url"), f"{param}.{kind}.url")
    if not url.startswith(MEDIA_URL_SCHEMES):
        raise field_error(f"{param}.{kind}.url", "expected an http(s) URL or a data: URI.")
    checked: dict[str, Any] = {"url": url}
    if media.get("detail") is not None:
        checked["detail"] = one_of(("auto", "low", "high"))(media["detail"], f"{param}.detail")
    return {"type": kind, kind: checked}


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    # Empty is what some SDKs replay for an assistant turn that called nothing.
    return array(_tool_call, max_items=MAX_TOOLS)(value, param)


def _tool_call(value: Any, param: str) -> dict[str, Any]:
    call = obj(value, param)
    known_keys(call, ("id", "type", "function", "index"), param)
    function = obj(call.get("function"), f"{param}.function")
    known_keys(function, ("name", "arguments"), f"{param}.function")
    arguments = function.get("arguments")
    where = f"{param}.function.arguments"
    out: dict[str, Any] = {
        "type": one_of(("function",))(call.get("type", "function"), f"{param}.type"),
        "function": {
            "name": function_name(function.get("name"), f"{param}.function.name"),
            # SGLang parses string arguments and requires an object (serving_chat.py).
            "arguments": json_text_object(arguments, where)
            if isinstance(arguments, str)
            else json_object(arguments, where),
        },
    }
    if call.get("id") is not None:
        out["id"] = text(MAX_NAME_CHARS)(call["id"], f"{param}.id")
    if call.get("index") is not None:
        out["index"] = integer(0, MAX_TOOLS)(call["index"], f"{param}.index")
    return out


# --- Tools and structured output ---------------------------------------------------------------


def _tool(value: Any, param: str) -> dict[str, Any]:
    tool = obj(value, param)
    known_keys(tool, ("type", "function"), param)
    one_of(("function",))(tool.get("type", "function"), f"{param}.type")
    function = obj(tool.get("function"), f"{param}.function")
    known_keys(function, ("name", "description", "parameters", "strict"), f"{param}.function")
    out: dict[str, Any] = {"name": function_name(function.get("name"), f"{param}.function.name")}
    if function.get("description") is not None:
        out["description"] = text(INT32_MAX)(function["description"], f"{param}.description")
    if function.get("parameters") is not None:
        out["parameters"] = json_object(function["parameters"], f"{param}.function.parameters")
    if function.get("strict") is not None:
        out["strict"] = boolean(function["strict"], f"{param}.function.strict")
    return {"type": "function", "function": out}


def _tool_choice(value: Any, param: str) -> Any:
    if isinstance(value, str):
        return one_of(("none", "auto", "required"))(value, param)
    choice = obj(value, param)
    known_keys(choice, ("type", "function"), param)
    one_of(("function",))(choice.get("type", "function"), f"{param}.type")
    function = obj(choice.get("function"), f"{param}.function")
    known_keys(function, ("name",), f"{param}.function")
    name = function_name(function.get("name"), f"{param}.function.name")
    return {"type": "function", "function": {"name": name}}


def _response_format(value: Any, param: str) -> dict[str, Any]:
    fmt = obj(value, param)
    known_keys(fmt, ("type", "json_schema"), param)
    kind = one_of(("text", "json_object", "json_schema"))(fmt.get("type"), f"{param}.type")
    if kind != "json_schema":
        return {"type": kind}
    where = f"{param}.json_schema"
    spec = obj(fmt.get("json_schema"), where)
    known_keys(spec, ("name", "description", "schema", "strict"), where)
    out: dict[str, Any] = {"name": function_name(spec.get("name"), f"{where}.name")}
    if spec.get("description") is not None:
        out["description"] = text(INT32_MAX)(spec["description"], f"{where}.description")
    if spec.get("schema") is not None:
        out["schema"] = json_object(spec["schema"], f"{where}.schema")
    if spec.get("strict") is not None:
        out["strict"] = boolean(spec["strict"], f"{where}.strict")
    return {"type": kind, "json_schema": out}


def _stream_options(value: Any, param: str) -> dict[str, Any]:
    options = obj(value, param)
    known_keys(options, ("include_usage", "continuous_usage_stats"), param)
    return {k: boolean(v, f"{param}.{k}") for k, v in options.items() if v is not None}


def _template_kwargs(value: Any, param: str) -> dict[str, Any]:
    kwargs = obj(value, param)
    for key in kwargs:
        if key not in TEMPLATE_KWARGS:
            raise invalid(
                f"chat_template_kwargs may only set {', '.join(TEMPLATE_KWARGS)}; chat "
                f"templates are the operator's ({param}.{key}).",
                param=f"{param}.{key}",
                code="parameter_not_allowed",
            )
    return {k: TEMPLATE_KWARGS[k](v, f"{param}.{k}") for k, v in kwargs.items() if v is not None}


# --- Token ids -----------------------------------------------------------------------------------


def _logit_bias(value: Any, param: str, ctx: Context) -> dict[str, Any]:
    bias = obj(value, param)
    if len(bias) > MAX_LOGIT_BIAS:
        raise field_error(param, f"at most {MAX_LOGIT_BIAS} tokens.")
    check_id, check_weight = token_id(ctx.vocab_size), number(-100, 100)
    for key, weight in bias.items():
        if not key.isascii() or not key.isdigit():
            raise field_error(f"{param}.{key}", "keys are token ids (non-negative integers).")
        check_id(int(key), f"{param}.{key}")
        check_weight(weight, f"{param}.{key}")
    return bias


def _token_ids(value: Any, param: str, ctx: Context) -> list[int]:
    return array(token_id(ctx.vocab_size), max_items=INT32_MAX, min_items=1)(value, param)


def _stop_token_ids(value: Any, param: str, ctx: Context) -> list[int]:
    ids = _token_ids(value, param, ctx)
    if len(ids) > 64:
        raise field_error(param, "at most 64 token ids.")
    return ids


def _prompt(value: Any, param: str, ctx: Context) -> Any:
    """A string, strings (a batch), token ids, or lists of token ids (a batch)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise field_error(param, "expected a string, strings, token ids or lists of token ids.")
    if len(value) > MAX_BATCH_PROMPTS and not isinstance(value[0], int):
        raise field_error(param, f"at most {MAX_BATCH_PROMPTS} prompts in one request.")
    first = value[0]
    if isinstance(first, str):
        return array(text(INT32_MAX), max_items=MAX_BATCH_PROMPTS)(value, param)
    if isinstance(first, list):
        return [_token_ids(ids, f"{param}[{i}]", ctx) for i, ids in enumerate(value)]
    return _token_ids(value, param, ctx)


def batch_size(prompt: Any) -> int:
    """How many prompts a completions `prompt` holds (each gets n choices)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return len(prompt)
    return 1


def _choices(value: Any, param: str, ctx: Context) -> int:
    return integer(1, ctx.max_choices)(value, param)


# --- The endpoints -------------------------------------------------------------------------------

_MAX_TOKENS = integer(1, INT32_MAX)
_COMMON: dict[str, FieldCheck] = {
    "frequency_penalty": _plain(number(-2, 2)),
    "presence_penalty": _plain(number(-2, 2)),
    "logit_bias": _logit_bias,
    "max_tokens": _plain(_MAX_TOKENS),
    "n": _choices,
    "seed": _plain(integer()),
    "stop": _plain(string_or_strings(MAX_STOP_SEQUENCES, MAX_STOP_CHARS)),
    "stream": _plain(boolean),
    "stream_options": _plain(_stream_options),
    "temperature": _plain(number(0, 2)),
    # SGLang refuses top_p = 0 (sampling_params.py: 0 < top_p <= 1).
    "top_p": _plain(number(0, 1, above_minimum=True)),
    "response_format": _plain(_response_format),
    "user": _plain(text(MAX_NAME_CHARS)),
}
SAFE_SGLANG_SAMPLING: dict[str, FieldCheck] = {
    "top_k": _plain(integer(-1, 2**30)),
    "min_p": _plain(number(0, 1)),
    "min_tokens": _plain(integer(0, INT32_MAX)),
    "repetition_penalty": _plain(number(0, 2, above_minimum=True)),
    "regex": _plain(text(MAX_GRAMMAR_CHARS)),
    "ebnf": _plain(text(MAX_GRAMMAR_CHARS)),
    "stop_token_ids": _stop_token_ids,
    "no_stop_trim": _plain(boolean),
    "skip_special_tokens": _plain(boolean),
}
CHAT_FIELDS: dict[str, FieldCheck] = {
    "messages": messages,
    **_COMMON,
    "logprobs": _plain(boolean),
    "top_logprobs": _plain(integer(0, 20)),
    "max_completion_tokens": _plain(_MAX_TOKENS),
    "tools": _plain(array(_tool, max_items=MAX_TOOLS)),
    "tool_choice": _plain(_tool_choice),
    "parallel_tool_calls": _plain(boolean),
    "reasoning_effort": _plain(one_of(REASONING_EFFORTS)),
    **SAFE_SGLANG_SAMPLING,
    "separate_reasoning": _plain(boolean),
    "stream_reasoning": _plain(boolean),
    "chat_template_kwargs": _plain(_template_kwargs),
}
COMPLETION_FIELDS: dict[str, FieldCheck] = {
    "prompt": _prompt,
    **_COMMON,
    "echo": _plain(boolean),
    "logprobs": _plain(integer(0, 5)),
    "suffix": _plain(text(INT32_MAX)),
    **SAFE_SGLANG_SAMPLING,
    "json_schema": _plain(json_text_object),
}
TOKENIZE_FIELDS: dict[str, FieldCheck] = {
    "prompt": _plain(text(INT32_MAX)),
    "messages": messages,
    "tools": _plain(array(_tool, max_items=MAX_TOOLS)),
    "tool_choice": _plain(_tool_choice),
    "chat_template_kwargs": _plain(_template_kwargs),
    "reasoning_effort": _plain(one_of(REASONING_EFFORTS)),
    "add_special_tokens": _plain(boolean),
}
ENDPOINT_FIELDS = {CHAT: CHAT_FIELDS, COMPLETIONS: COMPLETION_FIELDS, TOKENIZE: TOKENIZE_FIELDS}
# Accepted and checked, but not for the model server: the end user's id stays with us.
NOT_FORWARDED = frozenset({"user"})
# Read by the gateway when it resolves the model (gateway.app), not field checks.
RESOLVED_FIELDS = frozenset({"model", "lora_path"})

_flag = _plain(boolean)
EXTENSION_CHECKS: dict[str, FieldCheck] = {
    "ignore_eos": _flag,
    "stop_regex": _plain(string_or_strings(MAX_STOP_SEQUENCES, MAX_STOP_CHARS)),
    "return_hidden_states": lambda v, p, c: v if v == "last" else boolean(v, p),
    "return_routed_experts": _flag,
    "return_token_ids": _flag,
    "return_prompt_token_ids": _flag,
    "return_meta_info": _flag,
    "return_cached_tokens_details": _flag,
    "use_audio_in_video": _flag,
    "custom_labels": lambda v, p, c: _labels(v, p),
    "extra_key": _plain(text(MAX_NAME_CHARS)),
    "session_id": _plain(text(MAX_NAME_CHARS)),
    "session_params": _plain(json_object),
    "images_config": _plain(json_object),
    "max_dynamic_patch": _plain(integer(0, 1024)),
    "min_dynamic_patch": _plain(integer(0, 1024)),
}
assert set(EXTENSION_CHECKS) == set(OPERATOR_EXTENSIONS)


def _labels(value: Any, param: str) -> dict[str, str]:
    labels = obj(value, param)
    if len(labels) > 16:
        raise field_error(param, "at most 16 labels.")
    for key, label in labels.items():
        text(64)(key, f"{param}.{key}")
        text(128)(label, f"{param}.{key}")
    return labels


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object. orjson refuses NaN/Infinity, lone surrogates, invalid UTF-8
    and nesting past 1,024 levels without recursing in Python (the stdlib raised
    RecursionError on 100,000 brackets)."""
    if not body:
        raise invalid("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        message = f"The request body is not valid JSON: {str(exc)[:200]}"
        raise invalid(message, code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    return data


def require_model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("You must provide a model parameter.", param="model", code="missing_model")
    return text(MAX_NAME_CHARS)(model, "model")


@dataclass(slots=True)
class ValidRequest:
    """A checked request: the fields to forward and what admission needs to know."""

    fields: dict[str, Any]
    stream: bool
    client_wants_usage: bool  # not streamed, or stream_options.include_usage
    choices: int  # n × prompts: completions the upstream may generate
    max_tokens: int | None  # per choice, by SGLang's precedence; None = not given
    min_tokens: int


def validate(endpoint: str, data: Mapping[str, Any], ctx: Context) -> ValidRequest:
    spec = ENDPOINT_FIELDS[endpoint]
    fields: dict[str, Any] = {}
    for key, value in data.items():
        if key in RESOLVED_FIELDS:
            continue
        check = spec.get(key)
        if check is None:
            check = _not_standard(key, ctx)
        if value is not None:  # null means "not given", as OpenAI's SDKs treat it
            fields[key] = check(value, key, ctx)
    required = "messages" if endpoint == CHAT else "prompt"
    if endpoint != TOKENIZE and required not in fields:
        raise field_error(required, f"'{required}' is required.")
    if endpoint == TOKENIZE and ("prompt" in fields) == ("messages" in fields):
        raise invalid("Send exactly one of 'prompt' or 'messages'.", param="prompt")
    # SGLang reads max_completion_tokens first (ChatCompletionRequest.to_sampling_params).
    limit = fields.get("max_completion_tokens") or fields.get("max_tokens")
    minimum = fields.get("min_tokens", 0)
    if limit is not None and minimum > limit:
        raise field_error("min_tokens", "must not exceed the maximum number of tokens.")
    stream = fields.get("stream", False)
    options = fields.get("stream_options", {})
    return ValidRequest(
        fields={k: v for k, v in fields.items() if k not in NOT_FORWARDED},
        stream=stream,
        client_wants_usage=bool(options.get("include_usage")) if stream else True,
        choices=fields.get("n", 1) * batch_size(fields.get("prompt")),
        max_tokens=limit,
        min_tokens=minimum,
    )


def _not_standard(key: str, ctx: Context) -> FieldCheck:
    if key in GATEWAY_OWNED_FIELDS:
        raise _not_allowed(key, f"'{key}' cannot be sent by clients: {GATEWAY_OWNED_FIELDS[key]}.")
    if key in ctx.extra_fields:
        return EXTENSION_CHECKS.get(key, _plain(json_value))
    if key in EXTENSION_CHECKS:
        raise _not_allowed(
            key, f"'{key}' is an SGLang extension your plan does not allow; an operator can "
            "enable it for the plan (extra request fields).",
        )  # fmt: skip
    raise unknown_parameter(key)


def _not_allowed(param: str, message: str) -> GatewayError:
    return invalid(message, param=param, code="parameter_not_allowed")
