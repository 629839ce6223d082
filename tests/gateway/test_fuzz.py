"""Fuzzing the chat endpoint of a running gateway with bodies generated from its request schema.

Hypothesis builds bodies field by field from gateway/request_schema.py's allowlist, with values
that are sometimes right, sometimes of the wrong type or range, sometimes hostile (SGLang-native
fields, lone surrogates, deep nesting, odd keys). Whatever comes: no 5xx, every error in
OpenAI's shape, and the gateway still alive at the end. The examples are fixed
(`derandomize`), so CI runs the same ones every time; FUZZ_EXAMPLES raises the count locally.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.request_schema import CHAT_FIELDS, ROLES
from quotas.request_policy import GATEWAY_OWNED_FIELDS, OPERATOR_EXTENSIONS
from tests.gateway.conftest import FAST_MODEL, World, hooks_plan, make_user

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))

SURROGATES = st.sampled_from(["\ud800", "\udfff", "\ud83d", "\udc00\ud800"])
TEXT = st.text(max_size=24)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=10,
)


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"x": value}
    return value


PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": TEXT | st.fixed_dictionaries({"url": TEXT})}
    ),
    st.fixed_dictionaries({"type": TEXT}),
    JSON,
)
TOOL_CALL = st.fixed_dictionaries(
    {
        "id": TEXT,
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": TEXT, "arguments": TEXT | JSON}),
    },
)
GOOD_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}
)
ODD_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from([*ROLES, "wizard", "USER"]), "content": TEXT | st.lists(PART) | JSON},
    optional={
        "name": TEXT | JSON,
        "tool_calls": st.lists(TOOL_CALL, max_size=2) | JSON,
        "tool_call_id": TEXT | JSON,
        "refusal": st.none(),
        "unexpected": JSON,
    },
)
TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": TEXT}, optional={"parameters": JSON, "description": TEXT}
        ),
    },
)
FORMATS = st.sampled_from(["text", "json_object", "json_schema", "xml"])
TEMPLATE_KEYS = ["enable_thinking", "thinking", "reasoning_effort", "chat_template", "tokenize"]
# Values of every accepted field, within and just outside their ranges.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(-3, 40) | st.just(2**63),
    "max_completion_tokens": st.integers(-3, 40) | st.just(10**12),
    "min_tokens": st.integers(-2, 50),
    "n": st.integers(-1, 12),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 100),
    "min_p": st.floats(-1, 2),
    "repetition_penalty": st.floats(-1, 3),
    "frequency_penalty": st.floats(-3, 3),
    "presence_penalty": st.floats(-3, 3),
    "seed": st.integers(-(2**65), 2**65),
    "stop": TEXT | st.lists(TEXT, max_size=6),
    "stop_token_ids": st.lists(st.integers(-5, 200_000), max_size=3),
    "logit_bias": st.dictionaries(
        st.text("0123456789-x", max_size=7), st.floats(-200, 200), max_size=3
    ),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 25),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans(), "x": JSON}
    ),
    "tools": st.lists(TOOL, max_size=2),
    "tool_choice": st.sampled_from(["none", "auto", "required", "sometimes"]) | JSON,
    "response_format": st.fixed_dictionaries({"type": FORMATS}, optional={"json_schema": JSON}),
    "reasoning_effort": st.sampled_from(["none", "low", "high", "extreme"]),
    "chat_template_kwargs": st.dictionaries(
        st.sampled_from(TEMPLATE_KEYS),
        SCALARS | st.just("{% for i in range(99999) %}{% endfor %}"),
        max_size=2,
    ),
    "regex": TEXT,
    "ebnf": TEXT,
    "user": TEXT,
    "parallel_tool_calls": st.booleans(),
    "separate_reasoning": st.booleans(),
    "skip_special_tokens": st.booleans(),
}
assert set(PLAUSIBLE) <= set(CHAT_FIELDS)
HOSTILE_KEYS = sorted({*GATEWAY_OWNED_FIELDS, *OPERATOR_EXTENSIONS, "tempreature", "functions"})
MODELS = st.sampled_from(["korean-qwen", FAST_MODEL, "korean-qwen:legal-ko", "nope"])
MUTATIONS = ["none"] * 6 + [
    "wrong-type", "hostile-key", "surrogate", "deep", "odd-message", "odd-model", "null-field",
]  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A chat body built from the schema: a few fields, then (mostly) no or one mutation."""
    body: dict[str, Any] = {
        "model": draw(MODELS),
        "messages": draw(st.lists(GOOD_MESSAGE, min_size=1, max_size=3)),
        # Short answers keep the examples quick; a later field may override it.
        "max_tokens": 4,
    }
    for name in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=4, unique=True)):
        body[name] = draw(PLAUSIBLE[name])
    mutation = draw(st.sampled_from(MUTATIONS))
    field = draw(st.sampled_from(sorted(CHAT_FIELDS)))
    if mutation == "wrong-type":
        body[field] = draw(JSON)
    elif mutation == "hostile-key":
        body[draw(st.sampled_from(HOSTILE_KEYS))] = draw(JSON)
    elif mutation == "surrogate":
        odd = draw(TEXT) + draw(SURROGATES) + draw(TEXT)
        where = draw(st.sampled_from(["content", "stop", "model", "key", "user"]))
        if where == "content":
            body["messages"][-1]["content"] = odd
        elif where == "key":
            body[odd] = 1
        else:
            body[where] = odd
    elif mutation == "deep":
        body[field] = deep(draw(st.integers(60, 200)))
    elif mutation == "odd-message":
        body["messages"].append(draw(ODD_MESSAGE))
    elif mutation == "odd-model":
        body["model"] = draw(JSON)
    elif mutation == "null-field":
        body[field] = None
    return body


@pytest.fixture(scope="module")
def fuzz_client(world: World) -> Iterator[httpx.Client]:
    unlimited = dict.fromkeys(
        (
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_hour",
            "tokens_per_day",
            "max_parallel_requests",
        ),
        0,
    )
    with world.db():
        _, key = make_user("퍼저", hooks_plan(), **unlimited)
    with httpx.Client(
        base_url=world.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        yield client
    assert httpx.get(f"{world.url}/health", timeout=10).json() == {"status": "ok"}
    with world.db():
        from django.contrib.auth.models import User

        User.objects.filter(username="퍼저").delete()


def check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers.get("x-request-id")
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and isinstance(error["type"], str)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(body=bodies())
def test_chat_bodies_from_the_schema_never_get_a_5xx(fuzz_client: httpx.Client, body: Any) -> None:
    raw = json.dumps(body, ensure_ascii=True).encode()  # lone surrogates become \\udXXX escapes
    check_answer(
        fuzz_client.post(
            "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
        )
    )


@settings(
    max_examples=EXAMPLES // 3,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_never_get_a_5xx(fuzz_client: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/tokenize"):
        check_answer(fuzz_client.post(path, content=raw))
