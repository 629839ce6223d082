"""Limiter decisions per second and latency, embedded vs Redis, and the overshoot experiment.

    .venv/bin/python bench/limiter_bench.py [--redis-url redis://127.0.0.1:6379/0]
        [--seconds 3] [--write docs/benchmarks.md]

Decision = one admission plus its settlement (two round trips to Redis), timed from the
gateway's side. The overshoot experiment is the one LiteLLM 1.106.2 failed when the team
measured it: TPM 1,000, 40 requests released at once, each billed 100 tokens by the upstream.
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
from tokenlimit.limiter import (  # noqa: E402
    Day,
    Limits,
    Scope,
)
from tokenlimit.limiter_memory import MemoryBackend  # noqa: E402
from tokenlimit.limiter_redis import RedisBackend  # noqa: E402

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


def previous_redis_backend(url: str) -> RedisBackend:
    """The Redis backend as it was before issue 9: redis-py's default (non-blocking) pool and
    one 0.25 s timeout for connecting and for the reply."""
    import redis.asyncio as aioredis

    from tokenlimit.limiter_redis import LUA

    backend = RedisBackend(url, 0.25, prefix="bench")
    backend.client = aioredis.Redis.from_url(
        url, socket_timeout=0.25, socket_connect_timeout=0.25, retry_on_timeout=False
    )
    backend.script = backend.client.register_script(LUA)
    backend.deadline = 0.5
    return backend


async def burst(backend: RedisBackend, count: int, busy_ms: float) -> int:
    """`count` admissions released at once on an event loop that is also busy (a callback
    burning `busy_ms` of CPU every 10 ms, as request handling does under load); returns how
    many failed as LimiterUnavailable (each a 503 to a client)."""
    from tokenlimit.limiter import LimiterUnavailable

    scopes = [Scope(f"u:burst-{uuid.uuid4().hex[:8]}", ROOMY)]
    loop = asyncio.get_running_loop()
    hogging = True

    def hog() -> None:
        end = time.perf_counter() + busy_ms / 1000
        while time.perf_counter() < end:
            pass
        if hogging:
            loop.call_later(0.01, hog)

    async def one() -> int:
        try:
            await backend.admit(scopes, uuid.uuid4().hex, 10, time.time(), 60.0, DAY)
        except LimiterUnavailable:
            return 1
        return 0

    hog()
    failed = sum(await asyncio.gather(*(one() for _ in range(count))))
    hogging = False
    return failed


async def bursts(url: str) -> list[str]:
    rows = [
        "",
        "Bursts on a healthy Redis: admissions released at once from one process whose event "
        "loop is also busy; failures are 503s to clients.",
        "",
        "| burst | loop busy | before (default pool, 0.25 s timeout) | now (blocking pool "
        "64, connect 0.5 s, reply 2 s) |",
        "| --- | --- | --- | --- |",
    ]
    for count, busy_ms in ((250, 0.0), (1000, 0.0), (250, 50.0), (1000, 50.0), (1000, 300.0)):
        before = await burst(previous_redis_backend(url), count, busy_ms)
        now = await burst(RedisBackend(url, 0.5, prefix="bench", reply_timeout=2.0), count, busy_ms)
        rows.append(f"| {count} | {busy_ms:.0f} ms per 10 ms | {before} failed | {now} failed |")
    return rows


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def main_async(args: argparse.Namespace) -> str:
    backends: dict[str, object] = {"embedded": MemoryBackend()}
    if args.redis_url:
        backends["redis"] = RedisBackend(args.redis_url, 1.0, prefix="bench")
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
    if args.redis_url:
        rows += await bursts(args.redis_url)
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
