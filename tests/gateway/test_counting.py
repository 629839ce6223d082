"""Prompt counting on the request path: short prompts inline, long ones off the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway import counting
from gateway.caches import ModelInfo
from gateway.counting import INLINE_COUNT_MAX_BYTES, Counters
from quotas.tokens import get_counter

MODEL = ModelInfo(
    name="Qwen/Qwen2.5-7B-Instruct", aliases=(), upstream_url="http://x", tokenizer="",
    context_length=32768, korean_factor=None, request_timeout=30.0,
)  # fmt: skip


def count_in_thread(monkeypatch: pytest.MonkeyPatch, text: str) -> tuple[int, str]:
    seen: list[str] = []
    real = counting._count

    def spy(*args: object) -> int:
        seen.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(counting, "_count", spy)
    body = {"messages": [{"role": "user", "content": text}]}
    size = len(text.encode())
    count = asyncio.run(Counters().count_prompt(MODEL, "chat/completions", body, size))
    return count, seen[0]


def test_a_short_prompt_is_counted_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    count, thread = count_in_thread(monkeypatch, "안녕하세요, 반갑습니다.")
    assert thread == threading.main_thread().name
    assert count == get_counter(MODEL.name).count_chat(
        [{"role": "user", "content": "안녕하세요, 반갑습니다."}]
    )


def test_a_30000_character_prompt_is_counted_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = "서울의 가을 하늘은 높고 푸르다. " * 1700  # about 30,000 characters
    assert len(text.encode()) > INLINE_COUNT_MAX_BYTES
    count, thread = count_in_thread(monkeypatch, text)
    assert thread.startswith("token-count")
    assert count == get_counter(MODEL.name).count_chat([{"role": "user", "content": text}])


def test_the_tokenizer_loads_once_per_process() -> None:
    assert get_counter(MODEL.name) is get_counter(MODEL.name)


@pytest.mark.parametrize(
    ("text", "off_loop"), [("짧은 답변입니다.", False), ("긴 답변. " * 3000, True)]
)
def test_generated_text_is_counted_like_prompts(text: str, off_loop: bool, monkeypatch) -> None:
    counter = get_counter(MODEL.name)
    threads: list[str] = []
    real = counter.count_completion

    def spy(value: str) -> int:
        threads.append(threading.current_thread().name)
        return real(value)

    monkeypatch.setattr(counter, "count_completion", spy)
    assert asyncio.run(Counters().count_completion(MODEL, text)) == counter.count_text(text)
    assert threads[0].startswith("token-count") is off_loop
