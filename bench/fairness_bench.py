"""Contention on the GPU-like simulator: one heavy user against light interactive users.

    .venv/bin/python bench/fairness_bench.py [--seconds 30] [--heavy 64]

The situation issue 15 is about, measured on the simulator's GPU-like engine (sglang_sim/
engine.py; `--max-running-requests 64` as config/sglang_korean.yaml sets SGLang): a heavy user
keeps `--heavy` long streaming requests in flight (about 1,000 prompt and 256 answer tokens
each, a new one as soon as one ends) while 4 light users each send short interactive requests
(about 40 prompt and 32 answer tokens, one at a time with 0.3 s to read the answer). Light
users are first measured alone, then beside the heavy one. Reported per class: time to first
token p50/p99, completion time p50, tokens/s, and the upstream's total generation throughput.

Configurations: "direct" (clients to the upstream). The gateway's FIFO pass-through and its
fair scheduling are issue 15's next steps and get their columns then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import simulator  # noqa: E402

MODEL = "Qwen/Qwen2.5-7B-Instruct"
HEAVY_PROMPT = "다음 보고서를 자세히 요약하고 항목별로 정리해 주세요. " * 70  # ~1,000 tokens
LIGHT_PROMPT = "오늘 서울 날씨에 맞는 옷차림을 한 문장으로 알려 주세요."


@dataclass
class Samples:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    tokens: int = 0
    failed: int = 0

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


async def stream(
    session: aiohttp.ClientSession, url: str, prompt: str, tokens: int, into: Samples
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "stream": True}  # fmt: skip
    started = time.monotonic()
    first = None
    got = 0
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                into.failed += 1
                return
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    if first is None:
                        first = time.monotonic() - started
                    got += 1
    except aiohttp.ClientError:
        into.failed += 1
        return
    if first is not None:
        into.ttft.append(first)
    into.total.append(time.monotonic() - started)
    into.tokens += got


async def light_user(url: str, until: float, into: Samples) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        while time.monotonic() < until:
            await stream(session, url, LIGHT_PROMPT, 32, into)
            await asyncio.sleep(0.3)


async def heavy_user(url: str, until: float, in_flight: int, into: Samples) -> None:
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:

        async def lane(n: int) -> None:
            while time.monotonic() < until:
                await stream(session, url, f"{n}: {HEAVY_PROMPT}", 256, into)

        await asyncio.gather(*(lane(n) for n in range(in_flight)))


async def generated(url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("sglang:generation_tokens_total"):
            return float(line.split()[-1])
    return 0.0


async def scenario(url: str, seconds: float, heavy: int) -> tuple[Samples, Samples, float]:
    light, heavy_samples = Samples(), Samples()
    before, started = await generated(url), time.monotonic()
    until = started + seconds
    tasks = [light_user(url, until, light) for _ in range(4)]
    if heavy:
        tasks.append(heavy_user(url, until, heavy, heavy_samples))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    return light, heavy_samples, (await generated(url) - before) / elapsed


def row(name: str, samples: Samples, seconds: float) -> str:
    return (
        f"| {name} | {len(samples.total)} | {samples.pct(samples.ttft, 0.5):.0f} | "
        f"{samples.pct(samples.ttft, 0.99):.0f} | {samples.pct(samples.total, 0.5):.0f} | "
        f"{samples.tokens / seconds:.0f} | {samples.failed} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--heavy", type=int, default=64)
    options = parser.parse_args()
    engine = ("--engine", "gpu", "--max-running-requests", "64")
    with simulator(MODEL, extra=engine) as url:
        alone, _, alone_rate = asyncio.run(scenario(url, options.seconds, 0))
        light, heavy, rate = asyncio.run(scenario(url, options.seconds, options.heavy))
    seconds = options.seconds
    print("| direct, class | requests | TTFT p50 ms | TTFT p99 ms | completion p50 ms | "
          "tokens/s | failed |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(row("light users alone", alone, seconds))
    print(row("light users, heavy user running", light, seconds))
    print(row(f"heavy user ({options.heavy} in flight)", heavy, seconds))
    ratio = light.pct(light.ttft, 0.99) / max(alone.pct(alone.ttft, 0.99), 1e-9)
    print(f"\nupstream generation: {alone_rate:.0f} tokens/s alone, {rate:.0f} contended; "
          f"light TTFT p99 contended / alone = {ratio:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
