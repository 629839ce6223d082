"""Limiter decisions per second and latency, embedded vs Redis, and the overshoot experiment.

    .venv/bin/python bench/limiter_bench.py [--redis-url redis://127.0.0.1:6379/0]
        [--seconds 3] [--write docs/benchmarks.md]

Decision = one admission plus its settlement (two round trips to Redis), timed from the
gateway's side. The overshoot experiment is the one LiteLLM failed (../shared/reference/
peers.md): TPM 1,000, 40 requests released at once, each billed 100 tokens by the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
os.environ.setdefault("DEBUG", "1")

import django  # noqa: E402

django.setup()

from bench.gateway_bench import write_section  # noqa: E402
from quotas.limiter import Day, Scope  # noqa: E402
from quotas.limiter_memory import MemoryBackend  # noqa: E402
from quotas.limiter_redis import RedisBackend  # noqa: E402
from quotas.models import Limits  # noqa: E402

ROOMY = Limits(10**9, 10**12, 10**12, 10**12, 0, 10**6)
DAY = Day("20261124", 40_000.0)


async def decisions(backend: object, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        scopes = [Scope(f"u:bench-{uuid.uuid4().hex[:6]}-{n}", ROOMY)]
        while time.perf_counter() < deadline:
            rid = uuid.uuid4().hex
            started = time.perf_counter()
            now = time.time()
            await backend.admit(scopes, rid, 120, now, 60.0, DAY)
            await backend.settle(scopes, rid, 100, now, DAY)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), sorted(latencies)


async def overshoot(backend: object) -> tuple[int, int]:
    """TPM 1,000; 40 requests at once, each reserving prompt 20 + max_tokens 80 = 100 tokens."""
    shape = Limits(0, 1000, 0, 0, 0, 0)
    scopes = [Scope(f"u:overshoot-{uuid.uuid4().hex[:8]}", shape)]
    now = time.time()

    async def one() -> int:
        rid = uuid.uuid4().hex
        decision = await backend.admit(scopes, rid, 100, now, 60.0, DAY)
        if not decision.admitted:
            return 0
        await backend.settle(scopes, rid, 100, now, DAY)
        return 100

    billed = await asyncio.gather(*(one() for _ in range(40)))
    return sum(1 for b in billed if b), sum(billed)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def main_async(args: argparse.Namespace) -> str:
    backends: dict[str, object] = {"embedded": MemoryBackend()}
    if args.redis_url:
        backends["redis"] = RedisBackend(args.redis_url, timeout=1.0, prefix="bench")
    rows = [
        "| backend | clients | decisions/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, backend in backends.items():
        for concurrency in (1, 32):
            rate, latencies = await decisions(backend, args.seconds, concurrency)
            rows.append(
                f"| {name} | {concurrency} | {rate:,.0f} | {pct(latencies, 0.5):.3f} "
                f"| {pct(latencies, 0.99):.3f} |"
            )
    rows += [
        "",
        "Overshoot: TPM 1,000, 40 requests of 100 tokens released at once.",
        "",
        "| limiter | admitted requests | admitted tokens | of the limit |",
        "| --- | --- | --- | --- |",
        "| LiteLLM 1.106.2 (peers.md) | 15 | 1,500 | 150% |",
    ]
    for name, backend in backends.items():
        admitted, tokens = await overshoot(backend)
        rows.append(f"| ours, {name} | {admitted} | {tokens:,} | {tokens / 10:.0f}% |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    text = asyncio.run(main_async(args))
    print(text)
    if args.write:
        write_section(args.write, "limiter", text)


if __name__ == "__main__":
    main()
