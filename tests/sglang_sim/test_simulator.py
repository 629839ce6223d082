"""The SGLang simulator as a real process, driven with httpx and with the official openai SDK."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sglang_sim.server import ANSWER_PARAGRAPH
from tests.procs import simulator
from tokenlimit.tokens import TokenizerCounter, get_counter

pytestmark = pytest.mark.slow

MODEL = "Qwen/Qwen2.5-7B-Instruct"
EOS_ID = 151645  # <|im_end|>, SGLang's matched_stop when the model stops by itself
MESSAGES: list[Any] = [
    {"role": "system", "content": "당신은 친절한 한국어 비서입니다."},
    {"role": "user", "content": "서울에서 부산까지 KTX로 얼마나 걸리나요? 요금도 알려 주세요."},
]


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    with simulator(MODEL, tokens_per_second=0, ttft_ms=0) as url:
        yield url


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[str]:
    with simulator(MODEL, tokens_per_second=20, ttft_ms=10) as url:
        yield url


@pytest.fixture(scope="module")
def client(sim: str) -> Iterator[openai.OpenAI]:
    sdk = openai.OpenAI(base_url=f"{sim}/v1", api_key="simulator", max_retries=0)
    yield sdk
    sdk.close()


def chat(url: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "messages": MESSAGES, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers=headers, timeout=10)


def sse_events(response: httpx.Response) -> list[Any]:
    """Parsed `data:` events; "[DONE]" stays a string."""
    events = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metrics(url: str) -> dict[str, float]:
    """Counter and gauge samples by name (one model label, histogram buckets left out)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "le" not in sample.labels
    }


def answer_prefix(tokens: int) -> str:
    counter = get_counter(MODEL)
    assert isinstance(counter, TokenizerCounter)
    cycle = counter.encode(ANSWER_PARAGRAPH) + counter.encode(" " + ANSWER_PARAGRAPH) * 3
    return counter.decode(cycle[:tokens])


# --- chat completions -------------------------------------------------------------------------


def test_non_stream_usage_equals_the_gateway_count(sim: str) -> None:
    response = chat(sim, max_tokens=12)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    expected_prompt = get_counter(MODEL).count_chat(MESSAGES)
    assert body["usage"]["prompt_tokens"] == expected_prompt
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == expected_prompt + 12
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["matched_stop"] is None
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == answer_prefix(12)


def test_sdk_non_stream_korean_usage(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=7
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == get_counter(MODEL).count_chat(MESSAGES)
    assert completion.usage.completion_tokens == 7
    assert completion.choices[0].message.content == answer_prefix(7)


def test_template_kwargs_and_tools_reach_the_count(sim: str) -> None:
    tools = [{"type": "function", "function": {"name": "fare", "parameters": {"type": "object"}}}]
    body = chat(sim, max_tokens=1, tools=tools, chat_template_kwargs={"enable_thinking": False})
    expected = get_counter(MODEL).count_chat(MESSAGES, tools, enable_thinking=False)
    assert body.json()["usage"]["prompt_tokens"] == expected
    assert expected > get_counter(MODEL).count_chat(MESSAGES) + 20


def test_natural_stop_length_and_default_length(sim: str) -> None:
    stopped = chat(sim, headers={"x-sim-completion-tokens": "5"}).json()
    assert stopped["usage"]["completion_tokens"] == 5
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["matched_stop"] == EOS_ID
    capped = chat(sim, max_tokens=3, headers={"x-sim-completion-tokens": "5"}).json()
    assert capped["usage"]["completion_tokens"] == 3
    assert capped["choices"][0]["finish_reason"] == "length"
    default = chat(sim).json()
    assert default["usage"]["completion_tokens"] == 64
    assert default["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("tokens", [1, 2, 17, 53, 54, 55, 120])
def test_generated_text_recounts_to_completion_tokens(sim: str, tokens: int) -> None:
    # A gateway that has to count the answer itself (no usage) gets the upstream's number.
    body = chat(sim, max_tokens=tokens).json()
    text = body["choices"][0]["message"]["content"]
    assert get_counter(MODEL).count_completion(text) == body["usage"]["completion_tokens"] == tokens


def test_stream_include_usage_sends_one_chunk_per_token(sim: str) -> None:
    options = {"include_usage": True}
    response = chat(sim, stream=True, max_tokens=9, stream_options=options)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    first, *middle, finish, usage_chunk, _ = events
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["object"] == "chat.completion.chunk"
    contents = [e["choices"][0]["delta"]["content"] for e in middle]
    assert len(contents) == 9 and all(contents)
    assert "".join(contents) == answer_prefix(9)
    assert all("usage" not in e for e in [first, *middle, finish])
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["choices"][0]["delta"] == {}
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 9
    assert usage_chunk["usage"]["prompt_tokens"] == get_counter(MODEL).count_chat(MESSAGES)
    assert len({e["id"] for e in events[:-1]}) == 1


def test_sdk_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(content) == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].choices == []


def test_continuous_usage_stats_on_every_content_chunk(sim: str) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = sse_events(chat(sim, stream=True, max_tokens=4, stream_options=options))
    content_chunks = [
        e for e in events[:-1] if e["choices"] and "content" in e["choices"][0]["delta"]
    ]
    content_chunks = content_chunks[1:]  # the role chunk carries content "" and no usage
    assert [e["usage"]["completion_tokens"] for e in content_chunks] == [1, 2, 3, 4]
    prompt = get_counter(MODEL).count_chat(MESSAGES)
    assert all(e["usage"]["prompt_tokens"] == prompt for e in content_chunks)


def test_no_usage_hook_behaves_like_llama_cpp(sim: str) -> None:
    hooks = {"x-sim-no-usage": "1"}
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = sse_events(chat(sim, hooks, stream=True, max_tokens=5, stream_options=options))
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert all(e["choices"] for e in events[:-1])
    assert chat(sim, hooks, max_tokens=5).json()["usage"]["completion_tokens"] == 5
    # The same hook in the body, for callers (a gateway) that do not forward headers.
    in_body = chat(sim, stream=True, max_tokens=5, stream_options=options, sim={"no_usage": True})
    assert all("usage" not in e for e in sse_events(in_body)[:-1])


def test_cached_tokens_hook(sim: str) -> None:
    usage = chat(sim, {"x-sim-cached-tokens": "8"}, max_tokens=1).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 8}
    assert chat(sim, max_tokens=1).json()["usage"]["prompt_tokens_details"] is None


# --- completions ------------------------------------------------------------------------------


def test_completions_non_stream_and_stream(sim: str, client: openai.OpenAI) -> None:
    prompt = "한국의 수도는"
    expected = get_counter(MODEL).count_text(prompt)
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert completion.usage is not None and completion.usage.prompt_tokens == expected
    assert completion.usage.completion_tokens == 4
    assert completion.choices[0].text == answer_prefix(4)
    assert completion.object == "text_completion"
    default = httpx.post(f"{sim}/v1/completions", json={"prompt": prompt}, timeout=10).json()
    assert default["usage"]["completion_tokens"] == 16  # SGLang's default max_tokens
    body = {
        "prompt": prompt,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(httpx.post(f"{sim}/v1/completions", json=body, timeout=10))
    texts = [e["choices"][0]["text"] for e in events[:-1] if e["choices"]]
    assert len(texts) == 3 and "".join(texts) == answer_prefix(3)
    assert events[2]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 3 and events[-2]["choices"] == []


# --- errors -----------------------------------------------------------------------------------


def assert_flat_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"object", "message", "type", "param", "code"}
    assert body["object"] == "error" and body["code"] == status and body["param"] is None
    assert message in body["message"]


def test_errors_are_flat_like_sglang(sim: str) -> None:
    url = f"{sim}/v1/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert_flat_error(bad_json, 400, "JSON")
    assert bad_json.json()["type"] == "BadRequestError"
    assert_flat_error(
        httpx.post(url, content=b"{}", headers={"content-type": "text/plain"}),
        400,
        "application/json",
    )
    assert_flat_error(httpx.post(url, json={"messages": []}), 400, "Messages cannot be empty.")
    assert_flat_error(httpx.post(url, json={"model": MODEL}), 400, "messages")
    unknown = httpx.post(url, json={"model": "gpt-4o", "messages": MESSAGES})
    assert_flat_error(unknown, 400, "The model `gpt-4o` does not exist.")
    assert_flat_error(chat(sim, max_tokens=0), 400, "max_tokens")
    failing = chat(sim, {"x-sim-status": "503"})
    assert_flat_error(failing, 503, "Simulated error")
    assert failing.json()["type"] == "ServiceUnavailableError"


def test_too_long_prompt_is_refused_before_the_stream(sim: str) -> None:
    long_messages = [{"role": "user", "content": "가" * 40_000}]
    response = chat(sim, messages=long_messages, stream=True)
    assert_flat_error(response, 400, "is longer than the model's context length (32768 tokens)")
    too_much = chat(sim, max_tokens=32_760)
    assert_flat_error(too_much, 400, "Requested token count exceeds the model's maximum context")


def test_sdk_raises_bad_request_for_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=MESSAGES)


def test_stream_error_event_hook(sim: str) -> None:
    response = chat(sim, {"x-sim-error-after-tokens": "2"}, stream=True, max_tokens=10)
    events = sse_events(response)
    assert response.status_code == 200
    assert events[-1] == "[DONE]"
    assert (
        events[-2]["error"]["code"] == 500 and "Simulated failure" in events[-2]["error"]["message"]
    )
    assert sum(1 for e in events[:-2] if e["choices"][0]["delta"].get("content")) == 2


def test_delay_hook(sim: str) -> None:
    started = time.monotonic()
    assert chat(sim, {"x-sim-delay-ms": "250"}, max_tokens=1).status_code == 200
    assert time.monotonic() - started >= 0.25
    started = time.monotonic()
    assert chat(sim, max_tokens=1, sim={"delay_ms": 200}).status_code == 200
    assert time.monotonic() - started >= 0.2
    assert_flat_error(chat(sim, sim={"delay_ms": "soon"}), 400, "delay_ms")


# --- native routes ----------------------------------------------------------------------------


def test_models_health_server_info_and_load(sim: str, client: openai.OpenAI) -> None:
    cards = httpx.get(f"{sim}/v1/models").json()
    assert cards["object"] == "list"
    card = cards["data"][0]
    assert (card["id"], card["object"], card["owned_by"]) == (MODEL, "model", "sglang")
    assert card["max_model_len"] == 32768 and card["root"] == MODEL
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(f"{sim}/health")
    assert health.status_code == 200 and health.content == b""
    info = httpx.get(f"{sim}/get_server_info").json()
    assert info["max_total_num_tokens"] > 0 and "version" in info
    assert "last_gen_throughput" in info["internal_states"][0]
    assert set(httpx.get(f"{sim}/get_load").json()[0]) >= {"num_reqs", "num_waiting_reqs"}


def test_tokenize_prompt_and_messages(sim: str) -> None:
    counter = get_counter(MODEL)
    for path in ("/v1/tokenize", "/tokenize"):
        body = httpx.post(f"{sim}{path}", json={"model": MODEL, "prompt": "안녕하세요"}).json()
        assert body == {"tokens": counter.encode("안녕하세요"), "count": 3, "max_model_len": 32768}
    chat_body = httpx.post(f"{sim}/v1/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
    assert chat_body["count"] == counter.count_chat(MESSAGES) == len(chat_body["tokens"])


def test_metrics_move_with_requests(sim: str) -> None:
    before = metrics(sim)
    chat(sim, max_tokens=10)
    chat(sim, stream=True, max_tokens=5)
    after = metrics(sim)
    labels = 'model_name="Qwen/Qwen2.5-7B-Instruct"'
    assert labels in httpx.get(f"{sim}/metrics").text
    prompt = get_counter(MODEL).count_chat(MESSAGES)
    assert after["sglang:num_requests_total"] - before["sglang:num_requests_total"] == 2
    assert after["sglang:generation_tokens_total"] - before["sglang:generation_tokens_total"] == 15
    assert after["sglang:prompt_tokens_total"] - before["sglang:prompt_tokens_total"] == 2 * prompt
    ttft = "sglang:time_to_first_token_seconds_count"
    assert after[ttft] - before[ttft] == 2
    assert after["sglang:e2e_request_latency_seconds_count"] > 0
    assert after["sglang:num_running_reqs"] == 0 and after["sglang:num_queue_reqs"] == 0
    assert after["sglang:max_total_num_tokens"] > 0
    for name in ("sglang:token_usage", "sglang:gen_throughput", "sglang:cache_hit_rate"):
        assert name in after
    assert "sglang:num_aborted_requests_total" in after


# --- aborts -----------------------------------------------------------------------------------


def wait_for(url: str, check: Any, timeout: float = 1.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(url)
        if check(values) or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_client_disconnect_aborts_generation(slow_sim: str) -> None:
    aborted = "sglang:num_aborted_requests_total"
    before = metrics(slow_sim)[aborted]
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True}
    running = []
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{slow_sim}/v1/chat/completions", json=payload) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                running.append(metrics(slow_sim)["sglang:num_running_reqs"])
            if len(running) == 4:
                break  # leaving the loop closes the stream: the client is gone
    assert running == [1, 1, 1, 1]
    values = wait_for(
        slow_sim, lambda v: v[aborted] == before + 1 and v["sglang:num_running_reqs"] == 0
    )
    assert values[aborted] == before + 1
    assert values["sglang:num_running_reqs"] == 0
    assert values["sglang:generation_tokens_total"] < 20  # it stopped, not ran to 200 tokens


def test_abort_request_by_rid(slow_sim: str) -> None:
    rid = "gateway-req-123"
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True, "rid": rid}
    result: dict[str, Any] = {}

    def consume() -> None:
        response = httpx.post(f"{slow_sim}/v1/chat/completions", json=payload, timeout=20)
        result["events"] = sse_events(response)

    reader = threading.Thread(target=consume)
    reader.start()
    wait_for(slow_sim, lambda v: v["sglang:num_running_reqs"] == 1, timeout=2)
    time.sleep(0.2)
    assert httpx.post(f"{slow_sim}/abort_request", json={"rid": rid}).status_code == 200
    reader.join(timeout=5)
    events = result["events"]
    assert events[-1] == "[DONE]"
    assert events[0]["id"] == rid
    finish = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finish] == ["abort"]
    assert 1 <= len(events) - 3 < 200


def test_sim_routes_show_the_last_request_and_stats(sim: str) -> None:
    assert httpx.post(f"{sim}/sim/reset").status_code == 200
    chat(sim, max_tokens=3, temperature=0.2, chat_template_kwargs={"enable_thinking": False})
    seen = httpx.get(f"{sim}/sim/last_request").json()
    assert seen["temperature"] == 0.2 and seen["max_tokens"] == 3
    assert seen["chat_template_kwargs"] == {"enable_thinking": False}
    stats = httpx.get(f"{sim}/sim/stats").json()
    assert stats["requests"] == 1 and stats["completion_tokens"] == 3
    assert stats["peak_running"] == 1 and stats["running"] == 0 and stats["aborted"] == 0
