"""Contention on the GPU-like simulator: one heavy user against light interactive users.

    .venv/bin/python bench/fairness_bench.py [--seconds 30] [--warmup 15] [--heavy 64]
        [--workload long-prompts|long-answers] [--only NAME,NAME] [--set SETTING=VALUE]
        [--prefill-ms-per-token MS]

The situation issue 15 is about, measured on the simulator's GPU-like engine (sglang_sim/
engine.py; `--max-running-requests 64` as config/sglang_korean.yaml sets SGLang): a heavy user
keeps `--heavy` long streaming requests in flight (a new one as soon as one ends) while 4 light
users each send short interactive requests (about 40 prompt and 32 answer tokens, one at a time
with 0.3 s to read the answer). "Long" two ways (`--workload`): long prompts (about 1,000 prompt
and 256 answer tokens: each prefill is a ~95 ms step of the server's) or long answers (about
200 prompt and 1,024 answer tokens). Light users are first measured alone, then beside the
heavy one: the heavy user runs `--warmup` seconds alone first (its first burst of prefills is a
start-up, not the steady state), then `--seconds` are measured. Reported per class: time to
first token p50/p90/p99, completion time p50, tokens/s, and the upstream's total generation
throughput over the measured window.

Configurations, one run (CONFIGS): "direct" (clients to the upstream), "gateway FIFO" (through
the gateway, the model without places upstream: every request passes straight through),
"gateway fair" (the model with 64 places upstream, SGLang's own count: past them requests wait
in the gateway's fair queue, gateway/scheduling.py, with its defaults: a place kept for each
other user seen, 2 prefills a user and a user's only request prefilled first,
gateway/prefill_gate.py), the same without that last rule, and "gateway fair + priority" (the
light users' plan with priority 10 on a server started with --enable-priority-scheduling).
`--set` changes a setting of every gateway. The gateways run under uvicorn with the embedded
limiter (limits far above the load) on SQLite; each user has their own key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import free_port, running, simulator  # noqa: E402

MODEL = "Qwen/Qwen2.5-7B-Instruct"
HEAVY_SENTENCE = "다음 보고서를 자세히 요약하고 항목별로 정리해 주세요. "  # ~14 tokens
# The heavy user's requests: (prompt sentences, answer tokens).
WORKLOADS = {"long-prompts": (70, 256), "long-answers": (14, 1024)}
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
    session: aiohttp.ClientSession, url: str, key: str, prompt: str, tokens: int, into: Samples,
    since: float = 0.0,
) -> None:  # fmt: skip
    """One streamed request; measured into `into` if it started at `since` or later."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    if started < since:
        into = Samples()  # the warm-up: sent, not measured
    first = None
    got = 0
    try:
        async with session.post(
            f"{url}/v1/chat/completions", json=body, headers=headers
        ) as response:
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


async def light_user(url: str, key: str, until: float, into: Samples) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        while time.monotonic() < until:
            await stream(session, url, key, LIGHT_PROMPT, 32, into)
            await asyncio.sleep(0.3)


NO_HOLD = (("GATEWAY_QUEUE_FIRST_REQUEST_HOLD_SECONDS", "0"),)


@dataclass(frozen=True)
class HeavyLoad:
    in_flight: int
    sentences: int  # of HEAVY_SENTENCE in each prompt
    answer: int  # tokens


async def heavy_user(
    url: str, key: str, until: float, load: HeavyLoad, into: Samples, since: float
) -> None:
    in_flight, sentences, answer = load.in_flight, load.sentences, load.answer
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:

        async def lane(n: int) -> None:
            while time.monotonic() < until:
                # A new document each time: no configuration prefills from another's cache.
                prompt = f"{uuid.uuid4()}: {HEAVY_SENTENCE * sentences}"
                await stream(session, url, key, prompt, answer, into, since)

        await asyncio.gather(*(lane(n) for n in range(in_flight)))


async def generated(url: str) -> float:
    """The upstream's generated tokens so far (its own counter)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("sglang:generation_tokens_total"):
            return float(line.split()[-1])
    return 0.0


async def scenario(
    target: str,
    upstream: str,
    keys: dict[str, str],
    seconds: float,
    heavy: HeavyLoad | None,
    warmup: float,
) -> tuple[Samples, Samples, float]:
    """The heavy user (if any) starts first and runs `warmup` seconds alone (its first 64
    prefills at once are a start-up burst, not the steady state); then the light users join
    and everything is measured for `seconds`: requests started in that window, and the
    upstream's generated tokens over it."""
    light, heavy_samples = Samples(), Samples()
    started = time.monotonic()
    since = started + (warmup if heavy else 0.0)
    until = since + seconds
    heavy_lanes = None
    if heavy:
        heavy_lanes = asyncio.ensure_future(
            heavy_user(target, keys["heavy"], until, heavy, heavy_samples, since)
        )

    async def window() -> float:
        await asyncio.sleep(since - time.monotonic())
        before = await generated(upstream)
        await asyncio.gather(*(light_user(target, keys[f"light{n}"], until, light)
                               for n in range(4)))  # fmt: skip
        await asyncio.sleep(max(until - time.monotonic(), 0.0))
        return (await generated(upstream) - before) / (time.monotonic() - since)

    rate = await window()
    if heavy_lanes is not None:
        await heavy_lanes
    return light, heavy_samples, rate


@contextmanager
def gateway(
    upstream: str, places: int, light_priority: int | None = None,
    more_upstreams: Sequence[str] = (), settings: dict[str, str] | None = None,
) -> Iterator[tuple[str, dict[str, str], Path]]:  # fmt: skip
    """A gateway (uvicorn, SQLite, embedded limiter) in front of `upstream` (and
    `more_upstreams`, the model's other servers), the model with `places` upstream (0: no
    queue), and a key for each of the five users, with limits far above the load; the light
    users' plan has `light_priority` (None: no priority). Yields its URL, the keys by user and
    its database file."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {"DATABASE_URL": f"sqlite:///{scratch}/bench.sqlite3", "DEBUG": "1",
               "LIMITER_VAR_DIR": scratch, "SGLANG_URL": upstream, "LOG_LEVEL": "WARNING",
               "REDIS_URL": "", "GATEWAY_SELF_CHECK": "0", **(settings or {})}  # fmt: skip
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT,
                       env={**os.environ, **env}, check=True)  # fmt: skip
        seeded = subprocess.run(
            [sys.executable, "-c", SEED, MODEL, str(places), json.dumps(light_priority),
             json.dumps(list(more_upstreams))],
            cwd=ROOT, env={**os.environ, **env},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        keys = json.loads(seeded.stdout.strip().splitlines()[-1])
        port = free_port()
        command = ["-m", "uvicorn", "--port", str(port), "--lifespan", "on", "--no-access-log",
                   "limiter_site.asgi:application"]  # fmt: skip
        with running(command, f"http://127.0.0.1:{port}/health", env):
            yield f"http://127.0.0.1:{port}", keys, Path(scratch) / "bench.sqlite3"


SEED = """
import django, json, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
django.setup()
from accounts.services import create_api_key, get_or_create_user
from gateway.models import ServedModel
from quotas.models import Plan
from quotas.services import default_plan, set_user_quota
ServedModel.objects.update_or_create(
    name=sys.argv[1],
    defaults={"max_concurrent_requests": int(sys.argv[2]),
              "more_upstream_urls": json.loads(sys.argv[4])},
)
light_plan, _ = Plan.objects.update_or_create(
    name="interactive", defaults={"priority": json.loads(sys.argv[3])}
)
big, keys = 10**12, {}
for name in ["heavy"] + [f"light{n}" for n in range(4)]:
    user, _ = get_or_create_user(name)
    plan = default_plan() if name == "heavy" else light_plan
    set_user_quota(user, plan, actor=None, requests_per_minute=10**9,
                   tokens_per_minute=big, tokens_per_hour=big, tokens_per_day=big,
                   max_parallel_requests=10**6, cooldown_minutes=0)
    keys[name] = create_api_key(user, actor=None, name="bench")[1]
print(json.dumps(keys))
"""


def row(name: str, samples: Samples, seconds: float) -> str:
    return (
        f"| {name} | {len(samples.total)} | {samples.pct(samples.ttft, 0.5):,.0f} | "
        f"{samples.pct(samples.ttft, 0.9):,.0f} | {samples.pct(samples.ttft, 0.99):,.0f} | "
        f"{samples.pct(samples.total, 0.5):,.0f} | "
        f"{samples.tokens / seconds:.0f} | {samples.failed} |"
    )


@dataclass(frozen=True)
class Config:
    name: str
    places: int | None  # the model's places upstream; None: clients straight to the server
    ranked: bool = False  # the server with --enable-priority-scheduling, light plan priority 10
    settings: tuple[tuple[str, str], ...] = ()


CONFIGS = (
    Config("direct", None),
    Config("gateway FIFO", 0),
    Config("gateway fair, no first-request hold", 64, settings=NO_HOLD),
    Config("gateway fair", 64),
    Config("gateway fair + priority", 64, ranked=True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--heavy", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="long-prompts")
    parser.add_argument("--only", help="configurations to run, comma-separated (FIFO always)")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="a gateway setting for every gateway configuration")  # fmt: skip
    parser.add_argument("--prefill-ms-per-token", type=float, default=None,
                        help="the simulated GPU's prefill speed")  # fmt: skip
    options = parser.parse_args()
    engine: tuple[str, ...] = ("--engine", "gpu", "--max-running-requests", "64")
    if options.prefill_ms_per_token is not None:
        engine += ("--prefill-ms-per-token", str(options.prefill_ms_per_token))
    seconds, warmup = options.seconds, options.warmup
    heavy = HeavyLoad(options.heavy, *WORKLOADS[options.workload])
    chosen = [c for c in CONFIGS if options.only is None or c.name == "gateway FIFO"
              or c.name in options.only.split(",")]  # fmt: skip
    overrides = dict(setting.split("=", 1) for setting in options.set)
    results: dict[str, tuple[tuple[Samples, Samples, float], ...]] = {}
    with ExitStack() as stack:
        ranking = ("--enable-priority-scheduling",)
        servers = {
            ranked: stack.enter_context(simulator(MODEL, extra=engine + ranking * ranked))
            for ranked in {c.ranked for c in chosen}
        }
        runs: list[tuple[str, str, str, dict[str, str] | None]] = []
        for config in chosen:
            server = servers[config.ranked]
            if config.places is None:
                runs.append((config.name, server, server, None))
                continue
            target, users, _ = stack.enter_context(
                gateway(server, config.places, light_priority=10 if config.ranked else None,
                        settings={**dict(config.settings), **overrides})
            )  # fmt: skip
            runs.append((config.name, target, server, users))
        fifo_keys = next(users for name, _, _, users in runs if name == "gateway FIFO")
        assert fifo_keys is not None
        for name, target, server, own_keys in runs:
            users = own_keys or fifo_keys  # direct: the keys are not checked
            results[name] = (
                asyncio.run(scenario(target, server, users, seconds, None, warmup)),
                asyncio.run(scenario(target, server, users, seconds, heavy, warmup)),
            )
    print("| configuration, class | requests | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | "
          "completion p50 ms | tokens/s | failed |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (quiet, busy) in results.items():
        print(row(f"{name}: light users alone", quiet[0], seconds))
        print(row(f"{name}: light users beside the heavy one", busy[0], seconds))
        print(row(f"{name}: heavy user ({heavy.in_flight} in flight)", busy[1], seconds))
    print()
    for name, (quiet, busy) in results.items():
        light, alone = busy[0], quiet[0]
        ratio = light.pct(light.ttft, 0.99) / max(alone.pct(alone.ttft, 0.99), 1e-9)
        share = busy[2] / max(results["gateway FIFO"][1][2], 1e-9)
        print(f"{name}: upstream generation {quiet[2]:,.0f} tokens/s alone, {busy[2]:,.0f} "
              f"contended ({share:.0%} of FIFO's); light TTFT p99 contended / alone = "
              f"{ratio:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
