"""The request allowlist without servers: what is refused (and named), what is forwarded."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.preparation import UpstreamTarget, prepare, upstream_body
from gateway.request_schema import (
    CHAT,
    COMPLETIONS,
    TOKENIZE,
    Context,
    parse_json_object,
    require_model,
    validate,
)
from quotas.request_policy import (
    GATEWAY_OWNED_FIELDS,
    OPERATOR_EXTENSIONS,
    RequestAccess,
)
from tokenlimit.limiter import completion_budget
from tokenlimit.tokens import get_counter

MODEL = "Qwen/Qwen2.5-7B-Instruct"
CTX = Context(vocab_size=151665)
USER = [{"role": "user", "content": "안녕하세요"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "korean-qwen", "messages": USER, **fields}


def refused(endpoint: str, body: dict[str, Any], ctx: Context = CTX) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        validate(endpoint, body, ctx)
    error = json.loads(caught.value.body())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert caught.value.status == 400 and error["type"] == "invalid_request_error"
    return caught.value


# --- Parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        b'{"model": NaN}',
        b'{"temperature": Infinity}',
        b'{"max_tokens": 1e400}',
        b"\xef\xbb\xbf{}",
        b'{"model": "m", "messages": [{"role": "user", "content": "\xff"}]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    ],
    ids=[
        "empty",
        "garbage",
        "array",
        "nan",
        "infinity",
        "overflow",
        "bom",
        "bad-utf8",
        "100k-brackets",
        "100k-objects",
    ],
)
def test_unparseable_bodies_are_400_invalid_json(body: bytes) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_json_object(body)
    assert caught.value.status == 400 and caught.value.code == "invalid_json"


LONE = "\\ud800"


@pytest.mark.parametrize(
    "text",
    [
        f'{{"model": "m", "messages": [{{"role": "user", "content": "{LONE}"}}]}}',
        f'{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], "stop": "{LONE}"}}',
        f'{{"model": "m", "messages": [], "{LONE}": 1}}',
        f'{{"model": "{LONE}", "messages": []}}',
        f'{{"model": "m", "messages": [], "tools": [{{"function": {{"name": "{LONE}"}}}}]}}',
        '{"model": "m", "messages": [], "stop": "\\udfff"}',
    ],
    ids=["content", "stop", "key", "model", "tool-name", "low-surrogate"],
)
def test_lone_surrogates_anywhere_are_400(text: str) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_json_object(text.encode())
    assert caught.value.status == 400
    # The error body itself must build (it once failed on the surrogate it quoted).
    assert json.loads(caught.value.body())["error"]["code"] == "invalid_json"


def test_model_must_be_a_short_string() -> None:
    for bad in ({}, {"model": 5}, {"model": ""}, {"model": "m" * 300}):
        with pytest.raises(GatewayError) as caught:
            require_model(bad)
        assert caught.value.param == "model"


# --- What is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", sorted(GATEWAY_OWNED_FIELDS))
def test_gateway_owned_fields_are_refused_by_name(field: str) -> None:
    error = refused(CHAT, chat(**{field: "x"}))
    assert error.param == field and error.code == "parameter_not_allowed"


def test_owned_fields_stay_refused_even_if_a_plan_lists_them() -> None:
    ctx = Context(vocab_size=151665, extra_fields=frozenset({"rid", "custom_logit_processor"}))
    assert refused(CHAT, chat(rid="mine"), ctx).param == "rid"


@pytest.mark.parametrize("field", OPERATOR_EXTENSIONS)
def test_sglang_extensions_need_the_plan(field: str) -> None:
    error = refused(CHAT, chat(**{field: True}))
    assert error.param == field and error.code == "parameter_not_allowed"


def test_an_enabled_extension_is_checked_and_forwarded() -> None:
    ctx = Context(vocab_size=151665, extra_fields=frozenset({"ignore_eos", "sim"}))
    valid = validate(CHAT, chat(ignore_eos=True, sim={"delay_ms": 5}), ctx)
    assert valid.fields["ignore_eos"] is True and valid.fields["sim"] == {"delay_ms": 5}
    assert refused(CHAT, chat(ignore_eos="yes"), ctx).param == "ignore_eos"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tempreature": 0.5}, "tempreature"),
        ({"functions": []}, "functions"),
        ({"store": True}, "store"),
        ({"messages": [{"role": "user", "content": "x", "prefix": True}]}, "messages[0].prefix"),
        ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "y": 1}]}]},
            "messages[0].content[0].y",
        ),
    ],
)
def test_unknown_fields_are_named(fields: dict[str, Any], param: str) -> None:
    error = refused(CHAT, chat(**fields))
    assert error.param == param and error.code == "unknown_parameter"


NESTED: dict[str, Any] = {"type": "object"}
for _ in range(70):
    NESTED = {"type": "object", "properties": {"x": NESTED}}

WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"n": "2"}, "n"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"n": True}, "n"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -2.1}, "presence_penalty"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
    ({"logit_bias": {"-5": 1}}, "logit_bias.-5"),
    ({"logit_bias": {"151665": 1}}, "logit_bias.151665"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": ["x" * 1001]}, "stop[0]"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"seed": "1"}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": []}, "stream_options"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ({"stop_token_ids": [151665]}, "stop_token_ids[0]"),
    ({"regex": 5}, "regex"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"function": "x"}}, "tool_choice.function"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": {"name": "x"}}, "tools"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": NESTED}}]},
        "tools[0].function.parameters",
    ),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0].type"),
    (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]},
        "messages[0].content[0].type",
    ),
    (
        {"messages": [{"role": "tool", "content": "x", "tool_calls": []}]},
        "messages[0].tool_calls",
    ),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"function": 5}]}]},
        "messages[0].tool_calls[0].function",
    ),
    (
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "["}}]}
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
]


@pytest.mark.parametrize(("fields", "param"), WRONG_TYPES)
def test_wrong_typed_fields_are_400_with_their_param(fields: dict[str, Any], param: str) -> None:
    assert refused(CHAT, chat(**fields)).param == param


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_free_form_json_is_bounded_at_64_levels_without_recursion() -> None:
    ctx = Context(vocab_size=151665, extra_fields=frozenset({"sim"}))
    assert validate(CHAT, chat(sim=nested(64)), ctx).fields["sim"] == nested(64)
    assert refused(CHAT, chat(sim=nested(65)), ctx).param == "sim"
    deep = orjson.loads(b"[" * 1000 + b"]" * 1000)  # under orjson's own 1,024 limit
    assert refused(CHAT, chat(sim=deep), ctx).param == "sim"


def test_min_tokens_may_not_exceed_the_maximum() -> None:
    assert refused(CHAT, chat(max_tokens=5, min_tokens=6)).param == "min_tokens"
    validate(CHAT, chat(max_tokens=5, min_tokens=5), CTX)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {"chat_template": "{% for i in range(4000) %}{% endfor %}"},
            "chat_template_kwargs.chat_template",
        ),
        ({"tokenize": True}, "chat_template_kwargs.tokenize"),
        ({"add_generation_prompt": False}, "chat_template_kwargs.add_generation_prompt"),
        ({"enable_thinking": {"x": 1}}, "chat_template_kwargs.enable_thinking"),
        ({"reasoning_effort": "ultra"}, "chat_template_kwargs.reasoning_effort"),
    ],
)  # fmt: skip
def test_clients_cannot_bring_or_change_the_template(kwargs: dict, param: str) -> None:
    assert refused(CHAT, chat(chat_template_kwargs=kwargs)).param == param


def test_documented_template_flags_pass() -> None:
    kwargs = {"enable_thinking": False, "thinking": False, "reasoning_effort": "low"}
    assert validate(CHAT, chat(chat_template_kwargs=kwargs), CTX).fields[
        "chat_template_kwargs"
    ] == (kwargs)


def test_media_parts_need_a_model_that_accepts_media() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    body = chat(messages=[{"role": "user", "content": [image]}])
    assert refused(CHAT, body).code == "media_not_supported"
    media_ctx = Context(vocab_size=151665, accepts_media=True)
    assert validate(CHAT, body, media_ctx).fields["messages"][0]["content"] == [image]
    as_string = {"type": "image_url", "image_url": "https://example.com/a.png"}
    error = refused(CHAT, chat(messages=[{"role": "user", "content": [as_string]}]), media_ctx)
    assert error.param == "messages[0].content[0].image_url"
    local = {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
    error = refused(CHAT, chat(messages=[{"role": "user", "content": [local]}]), media_ctx)
    assert error.param == "messages[0].content[0].image_url.url"


@pytest.mark.parametrize(
    ("prompt", "ok"),
    [
        ("안녕", True),
        (["a", "b"], True),
        ([1, 2, 3], True),
        ([[1, 2], [3]], True),
        ("", True),
        ([], False),
        ([1, "a"], False),
        ([-1], False),
        ([151665], False),
        ([True], False),
        (5, False),
        ([[]], False),
        (["x"] * 129, False),
    ],
)
def test_completion_prompts(prompt: object, ok: bool) -> None:
    body = {"model": "m", "prompt": prompt}
    if ok:
        assert validate(COMPLETIONS, body, CTX).fields["prompt"] == prompt
    else:
        assert str(refused(COMPLETIONS, body).param).startswith("prompt")


def test_tokenize_takes_exactly_one_input_and_only_its_fields() -> None:
    validate(TOKENIZE, {"model": "m", "prompt": "안녕"}, CTX)
    assert refused(TOKENIZE, {"model": "m"}).param == "prompt"
    assert refused(TOKENIZE, {"model": "m", "prompt": "a", "messages": USER}).param == "prompt"
    assert refused(TOKENIZE, {"model": "m", "prompt": "a", "max_tokens": 3}).param == "max_tokens"


# --- What is forwarded ---------------------------------------------------------------------------

FULL_CHAT: dict[str, Any] = chat(
    messages=[
        {"role": "system", "content": "너는 도우미야"},
        {"role": "user", "content": [{"type": "text", "text": "안녕"}], "name": "민수"},
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "날씨", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "{}", "tool_call_id": "c1"},
    ],
    temperature=0.7,
    top_p=0.9,
    top_k=20,
    min_p=0.05,
    repetition_penalty=1.1,
    frequency_penalty=0.5,
    presence_penalty=0.1,
    logit_bias={"151643": -100},
    logprobs=True,
    top_logprobs=3,
    max_completion_tokens=64,
    min_tokens=4,
    n=2,
    seed=42,
    stop=["끝"],
    stop_token_ids=[151645],
    stream=True,
    stream_options={"include_usage": False},
    response_format={
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {"type": "object", "properties": {}}},
    },
    tools=[
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ],
    tool_choice="auto",
    parallel_tool_calls=False,
    reasoning_effort="low",
    regex="[가-힣]+",
    no_stop_trim=True,
    skip_special_tokens=False,
    separate_reasoning=True,
    chat_template_kwargs={"enable_thinking": False},
    user="end-user-7",
)


def test_a_full_chat_request_passes_and_reaches_upstream_unchanged() -> None:
    fields = validate(CHAT, FULL_CHAT, CTX).fields
    sent = json.loads(upstream_body_for(FULL_CHAT))
    for key, value in FULL_CHAT.items():
        if key in ("model", "user", "messages", "stream_options", "tool_choice", "tools"):
            continue
        assert sent[key] == value, key
    assert fields["messages"][2] == {k: v for k, v in FULL_CHAT["messages"][2].items() if v}
    assert sent["tools"] == FULL_CHAT["tools"]
    assert "user" not in sent  # the end user's id stays here
    assert "refusal" not in sent["messages"][2]


def upstream_body_for(body: dict[str, Any]) -> bytes:
    valid = validate(CHAT, body, CTX)
    target = UpstreamTarget(MODEL, None, "req-1", RequestAccess())
    return upstream_body(valid, target, None)


def test_the_gateway_sets_rid_priority_cache_salt_adapter_and_stream_usage() -> None:
    access = RequestAccess(priority=7, cache_salt="s" * 32)
    valid = validate(CHAT, chat(stream=True), CTX)
    target = UpstreamTarget(MODEL, "legal-ko", "req-9", access)
    sent = orjson.loads(upstream_body(valid, target, 100))
    assert sent == {
        "model": MODEL,
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
        "lora_path": "legal-ko",
        "max_tokens": 100,
        "rid": "req-9",
        "priority": 7,
        "cache_salt": "s" * 32,
    }
    quiet = orjson.loads(upstream_body_for(chat()))
    assert "priority" not in quiet and "cache_salt" not in quiet and "stream_options" not in quiet


# --- What is reserved ----------------------------------------------------------------------------


def budget(prompt: int = 50, **kwargs: Any) -> tuple[int, int | None]:
    args = {"choices": 1, "max_tokens": None, "min_tokens": 0, "context_length": 32768,
            "default_max": 4096, **kwargs}  # fmt: skip
    result = completion_budget(prompt, **args)
    return result.reserved, result.forced_max


def test_reservation_covers_every_choice_and_bills_the_prompt_once() -> None:
    assert budget(max_tokens=100) == (150, None)
    assert budget(max_tokens=100, choices=4) == (450, None)


def test_reservation_follows_sglangs_precedence_and_min_tokens() -> None:
    # max_completion_tokens 300 with max_tokens 1: SGLang generates 300, so 300 is reserved.
    valid = validate(CHAT, chat(max_completion_tokens=300, max_tokens=1), CTX)
    assert valid.max_tokens == 300
    assert budget(max_tokens=valid.max_tokens) == (350, None)
    assert budget(min_tokens=5000) == (5050, 5000)


def test_without_a_maximum_the_gateway_sends_the_one_it_reserved() -> None:
    assert budget() == (50 + 4096, 4096)
    assert budget(30000) == (32767, 2767)  # within the context, one token to spare
    assert budget(40000) == (40000, None)  # SGLang refuses it; nothing can be generated
    assert budget(max_tokens=10**9) == (32768, None)  # capped at the context


def test_prepare_counts_reserves_and_builds_the_body_in_one_step() -> None:
    counter = get_counter(MODEL)
    target = UpstreamTarget(MODEL, None, "req-3", RequestAccess())
    prepared = prepare(CHAT, chat(n=3, max_tokens=20), CTX, counter, 32768, target)
    prompt = counter.count_chat(USER)
    assert prepared.prompt_tokens == prompt
    assert prepared.budget.reserved == prompt + 3 * 20
    completions = prepare(
        COMPLETIONS, {"model": "m", "prompt": ["가", "나"], "n": 2}, CTX, counter, 32768, target
    )
    assert completions.budget.reserved == completions.prompt_tokens + 2 * 2 * 16
    assert json.loads(completions.upstream_body)["max_tokens"] == 16
