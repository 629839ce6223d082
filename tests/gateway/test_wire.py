"""The gateway's wire handling without servers: SSE splitting, usage spotting, error shapes."""

from __future__ import annotations

import json

import pytest

from gateway.errors import GatewayError, rewrite_upstream_error
from gateway.sse import EventSplitter, StreamAccount, response_usage
from gateway.validation import parse_json_object, validate_chat, validate_completion


def chunk(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode()


def test_splitter_keeps_partial_events_until_complete() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a": 1}\n\ndata: {"b"') == [b'data: {"a": 1}']
    assert splitter.feed(b": 2}\r\n\r\ndata: [DONE]\n\n") == [b'data: {"b": 2}', b"data: [DONE]"]
    assert splitter.rest() == b""


def test_usage_only_chunk_is_recognised_and_content_is_not_parsed_for_usage() -> None:
    account = StreamAccount()
    content = chunk({"choices": [{"delta": {"content": "안녕"}}], "usage": None})
    usage_chunk = chunk(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 3,
                "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
        }
    )
    assert account.inspect(content) is True
    assert account.usage is None
    assert account.inspect(usage_chunk) is False
    assert account.inspect(b"data: [DONE]") is True
    assert account.saw_done
    assert (account.usage.prompt_tokens, account.usage.completion_tokens) == (12, 3)
    assert account.usage.cached_tokens == 4


def test_continuous_usage_chunks_are_kept() -> None:
    account = StreamAccount()
    event = chunk(
        {
            "choices": [{"delta": {"content": "가"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1},
        }
    )
    assert account.inspect(event) is True
    assert account.usage is not None and account.usage.completion_tokens == 1


def test_generated_text_is_recovered_from_chat_and_completion_chunks() -> None:
    account = StreamAccount()
    account.inspect(chunk({"choices": [{"delta": {"role": "assistant"}}]}))
    account.inspect(chunk({"choices": [{"delta": {"content": "서울은 "}}]}))
    account.inspect(chunk({"choices": [{"text": "맑음"}]}))
    account.inspect(chunk({"choices": [{"delta": {"content": '"error": {'}}]}))
    assert account.generated_text() == '서울은 맑음"error": {'
    assert account.error == ""


def test_stream_error_event_sets_error_type() -> None:
    account = StreamAccount()
    account.inspect(chunk({"error": {"message": "x", "type": "BadRequestError", "code": 400}}))
    assert account.error == "BadRequestError"


def test_response_usage_reads_non_streaming_body() -> None:
    body = json.dumps(
        {
            "choices": [{"message": {"role": "assistant", "content": "네"}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
        }
    ).encode()
    usage, text = response_usage(body)
    assert usage is not None and usage.prompt_tokens == 7 and text == "네"
    assert response_usage(b"not json") == (None, "")


def test_flat_sglang_error_becomes_openai_shape() -> None:
    flat = json.dumps(
        {"object": "error", "message": "bad", "type": "BadRequestError", "param": None, "code": 400}
    ).encode()
    error = json.loads(rewrite_upstream_error(400, flat))["error"]
    assert error == {"message": "bad", "type": "invalid_request_error", "param": None, "code": 400}
    nested = b'{"error": {"message": "m", "type": "t", "param": null, "code": null}}'
    assert rewrite_upstream_error(500, nested) == nested
    html = json.loads(rewrite_upstream_error(502, b"<html>Bad Gateway</html>"))["error"]
    assert html["type"] == "upstream_error" and "Bad Gateway" in html["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": ["hi"]}', "messages[0]"),
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "user"}]}', "messages[0].content"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]}',
            "messages[0].content",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            "max_tokens",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            "stream",
        ),
    ],
)
def test_bad_chat_bodies_are_400_with_param(body: bytes, param: str | None) -> None:
    with pytest.raises(GatewayError) as caught:
        validate_chat(parse_json_object(body))
    assert caught.value.status == 400
    assert caught.value.param == param
    error = json.loads(caught.value.body())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_good_chat_bodies_pass() -> None:
    validate_chat(
        {
            "messages": [
                {"role": "system", "content": "너는 도우미야"},
                {"role": "user", "content": [{"type": "text", "text": "안녕"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "tool", "content": "{}", "tool_call_id": "1"},
            ],
            "max_tokens": 10,
            "stream": True,
            "stream_options": {"include_usage": False},
        }
    )


@pytest.mark.parametrize("prompt", ["안녕", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompts_pass(prompt: object) -> None:
    validate_completion({"prompt": prompt})


@pytest.mark.parametrize("prompt", [None, "", [], [1, "a"], 5, [True]])
def test_bad_completion_prompts_fail(prompt: object) -> None:
    if prompt == "":
        validate_completion({"prompt": prompt})  # an empty string is SGLang's to judge
        return
    with pytest.raises(GatewayError):
        validate_completion({"prompt": prompt})


def make_call(body: dict, raw: bytes, streamed: bool) -> object:
    from gateway.caches import ModelInfo
    from gateway.proxy import Call

    model = ModelInfo(
        "Qwen/Qwen2.5-7B-Instruct", ("korean-qwen",), "http://x", "", 32768, None, 30.0
    )
    return Call("rid", None, model, "chat/completions", body, streamed, True, raw_body=raw)


def test_upstream_body_is_the_clients_bytes_when_nothing_changes() -> None:
    from gateway.proxy import prepare_upstream_body

    raw = b'{"model": "Qwen/Qwen2.5-7B-Instruct", "messages": [], "x_extra": 1}'
    assert prepare_upstream_body(make_call(json.loads(raw), raw, False)) is raw


def test_upstream_body_resolves_aliases_and_always_asks_for_stream_usage() -> None:
    from gateway.proxy import prepare_upstream_body

    raw = b'{"model": "korean-qwen", "messages": [], "stream": true, "x_extra": [1, 2]}'
    sent = json.loads(prepare_upstream_body(make_call(json.loads(raw), raw, True)))
    assert sent["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["x_extra"] == [1, 2]
