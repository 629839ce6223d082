"""The front door's own costs, side by side in one run.

    .venv/bin/python bench/request_bench.py [--write docs/benchmarks.md]

- parsing and serialising a request body: the standard library's json against orjson;
- checking a typical chat body against the allowlist (gateway/request_schema.py);
- rendering the chat template in the plain sandbox against the budgeted one;
- how long the event loop stands still while a 750,000-character prompt is tokenized on a
  worker thread: through the tokenizer's `encode` (holds the GIL) against `encode_batch`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")

import django  # noqa: E402

django.setup()

import orjson  # noqa: E402
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402
from transformers.utils import chat_template_utils  # noqa: E402

from bench.gateway_bench import write_section  # noqa: E402
from gateway.request_schema import CHAT, Context, validate  # noqa: E402
from tokenlimit.chat_templates import BudgetedEnvironment, budget  # noqa: E402
from tokenlimit.tokens import TokenizerCounter, get_counter  # noqa: E402

MODEL = "Qwen/Qwen2.5-7B-Instruct"
MESSAGES = [
    {"role": "system", "content": "당신은 친절한 한국어 AI 어시스턴트입니다."},
    {"role": "user", "content": "안녕하세요! 한국어로 간단히 자기소개를 해 주세요. " * 3},
]
SMALL = {"model": "korean-qwen", "messages": MESSAGES, "max_tokens": 100, "temperature": 0.7}
LONG_TEXT = "한국어 문장입니다. " * 30000
LARGE = {"model": "korean-qwen", "messages": [{"role": "user", "content": LONG_TEXT}]}


def per_call_us(fn: Callable[[], Any], seconds: float = 0.5) -> float:
    number = 1
    while timeit.timeit(fn, number=number) < seconds / 5:
        number *= 2
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def bodies() -> list[str]:
    rows = []
    for name, body in (("a chat body", SMALL), ("a long chat body", LARGE)):
        rows.extend(body_rows(name, json.dumps(body, ensure_ascii=False).encode()))
    return rows


def body_rows(name: str, raw: bytes) -> list[str]:
    parsed = json.loads(raw)
    label = f"{name} ({len(raw):,} bytes)"
    parse = per_call_us(lambda: json.loads(raw)), per_call_us(lambda: orjson.loads(raw))
    dump = (
        per_call_us(lambda: json.dumps(parsed, ensure_ascii=False).encode()),
        per_call_us(lambda: orjson.dumps(parsed)),
    )
    return [
        f"| parse {label} | {parse[0]:,.1f} | {parse[1]:,.1f} |",
        f"| serialise {label} | {dump[0]:,.1f} | {dump[1]:,.1f} |",
    ]


def templates(counter: TokenizerCounter) -> tuple[float, float, float]:
    """Best of five interleaved rounds each: plain sandbox, budgeted without and with a budget."""

    def use(environment: type) -> None:
        setattr(chat_template_utils, "ImmutableSandboxedEnvironment", environment)  # noqa: B010
        chat_template_utils._compile_jinja_template.cache_clear()
        counter.render_chat(MESSAGES)  # compile outside the timing

    def render() -> str:
        return counter.render_chat(MESSAGES * 5)

    def in_budget() -> str:
        with budget(10.0, 10**8):
            return render()

    best = [float("inf")] * 3
    for _ in range(5):
        use(ImmutableSandboxedEnvironment)
        best[0] = min(best[0], per_call_us(render, 0.3))
        use(BudgetedEnvironment)
        best[1] = min(best[1], per_call_us(render, 0.3))
        best[2] = min(best[2], per_call_us(in_budget, 0.3))
    return best[0], best[1], best[2]


async def loop_stall(count: Callable[[str], Any], text: str) -> tuple[float, float]:
    """(worst gap between event-loop ticks, duration of the count) while counting on a thread."""
    gaps: list[float] = []

    async def ticker() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            gaps.append(time.perf_counter() - started)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.05)
    gaps.clear()
    started = time.perf_counter()
    await asyncio.get_running_loop().run_in_executor(None, count, text)
    took = time.perf_counter() - started
    task.cancel()
    return max(gaps), took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    counter = get_counter(MODEL)
    assert isinstance(counter, TokenizerCounter)
    lines = ["| work | json / plain µs | orjson / ours µs |", "| --- | --- | --- |", *bodies()]
    ctx = Context(vocab_size=counter.vocab_size)
    check = per_call_us(lambda: validate(CHAT, SMALL, ctx))
    lines.append(f"| allowlist check of the chat body | — | {check:,.1f} |")
    plain, unbudgeted, budgeted = templates(counter)
    render = "render 10 messages: plain sandbox / budgeted"
    lines.append(f"| {render}, no budget set | {plain:,.0f} | {unbudgeted:,.0f} |")
    lines.append(f"| {render}, in a budget | {plain:,.0f} | {budgeted:,.0f} |")
    backend = counter.tokenizer.backend_tokenizer
    text = "한국어 문장입니다. 오늘은 날씨가 좋습니다. " * 30_000
    held = asyncio.run(loop_stall(lambda t: backend.encode(t, add_special_tokens=False), text))
    freed = asyncio.run(loop_stall(counter.count_text, text))
    lines.append("")
    lines.append(
        "| 750,000 characters tokenized on a worker thread | took ms | loop stood still ms |"
    )
    lines.append("| --- | --- | --- |")
    lines.append(f"| `encode` (before) | {held[1] * 1000:,.0f} | {held[0] * 1000:,.0f} |")
    lines.append(f"| `encode_batch` (now) | {freed[1] * 1000:,.0f} | {freed[0] * 1000:,.0f} |")
    text_out = "\n".join(lines)
    print(text_out)
    if args.write:
        write_section(args.write, "request", text_out)


if __name__ == "__main__":
    main()
