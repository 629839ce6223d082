"""Chat templates render under a time and size budget, exactly as they would without one."""

from __future__ import annotations

import copy
import time

import pytest

from tokenlimit import chat_templates
from tokenlimit.chat_templates import TemplateBudgetExceeded, budget
from tokenlimit.tokens import TokenizerCounter, get_counter

MODEL = "Qwen/Qwen2.5-7B-Instruct"
CHAT = [
    {"role": "system", "content": "당신은 친절한 한국어 도우미입니다."},
    {"role": "user", "content": "서울의 관광지를 세 곳 추천해 주세요."},
]
BOMBS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "string times a big number": "{{ 'x' * 10**8 }}",
    "a big power": "{{ (10 ** 100000000) % 7 }}",
    "doubling in a namespace": "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "output flood": "{% for i in range(100000) %}{{ messages[0].content * 1 }}{% endfor %}",
}


def counter_with_template(template: str) -> TokenizerCounter:
    real = get_counter(MODEL)
    assert isinstance(real, TokenizerCounter)
    tokenizer = copy.copy(real.tokenizer)
    tokenizer.chat_template = template
    return TokenizerCounter(tokenizer, "test")


def test_transformers_compiles_templates_in_the_budgeted_sandbox() -> None:
    counter = get_counter(MODEL)
    assert isinstance(counter, TokenizerCounter)
    assert chat_templates.installed_for(counter.tokenizer.chat_template)


def test_the_budget_changes_nothing_about_a_normal_render() -> None:
    counter = get_counter(MODEL)
    tools = [{"type": "function", "function": {"name": "날씨", "parameters": {"type": "object"}}}]
    free = counter.render_chat(CHAT, tools, enable_thinking=False)
    with budget(1.0, 1_000_000):
        assert counter.render_chat(CHAT, tools, enable_thinking=False) == free


@pytest.mark.parametrize("name", BOMBS)
def test_a_runaway_template_stops_within_its_budget(name: str) -> None:
    counter = counter_with_template(BOMBS[name])
    messages = [{"role": "user", "content": "가" * 1000}]
    started = time.monotonic()
    with pytest.raises(TemplateBudgetExceeded), budget(0.2, 1_000_000):
        counter.count_chat(messages)
    assert time.monotonic() - started < 0.5


def test_outside_a_budget_only_jinjas_own_sandbox_applies() -> None:
    counter = counter_with_template("{% for i in range(100) %}{{ 'ab' * 1000 }}{% endfor %}")
    assert counter.count_chat(CHAT) > 0  # 200,000 characters: fine without a budget
    with pytest.raises(TemplateBudgetExceeded), budget(5.0, 100_000):
        counter.count_chat(CHAT)
