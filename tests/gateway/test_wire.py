"""The gateway's wire handling without servers: SSE splitting, usage spotting, error shapes."""

from __future__ import annotations

import json

from gateway.errors import rewrite_upstream_error
from gateway.sse import EventSplitter, StreamAccount, response_usage


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
