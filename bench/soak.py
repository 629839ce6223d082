"""Soak: mixed traffic for minutes while the worker restarts, Redis restarts and a gateway is
SIGKILLed; then every answered request must have exactly one ledger row, and no process may
grow without bound.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_soak \\
        .venv/bin/python bench/soak.py [--minutes 10] [--write docs/benchmarks.md]

Starts, as real processes: a private redis-server with the append-only file the README
requires, the SGLang simulator, two uvicorn gateways sharing one spool directory (one host), and
a Celery worker with beat. The database named by DATABASE_URL is migrated and written to (use a
scratch database). At 25 % of the run the worker is stopped and restarted, at 50 % Redis is
SIGKILLed and restarted, at 75 % one gateway is SIGKILLed and restarted 5 s later (clients move
to the other meanwhile). Reported: requests sent, answered, broken mid-way, rows written (and how
many of them interrupted), answered requests without exactly one row, dead letters, and each
process's RSS after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
os.environ.setdefault("DEBUG", "1")

from tests.procs import RedisProcess, free_port, running, stop_group  # noqa: E402

MODEL = "Qwen/Qwen2.5-7B-Instruct"
PROMPTS = [
    "서울의 오늘 날씨를 한 문장으로 알려 주세요.",
    "다음 문장을 영어로 번역해 주세요: 나는 아침마다 커피를 마십니다.",
    "파이썬으로 리스트를 정렬하는 방법을 설명해 주세요.",
    "짧은 시를 하나 써 주세요.",
]
CLIENTS = 16
Action = Callable[[], None]


@dataclass
class Tally:
    sent: int = 0  # a connection to a gateway was made
    refused: int = 0  # no gateway to connect to (the killed one, for a moment)
    answered: dict[str, int] = field(default_factory=dict)  # request id → status
    broken: int = 0  # the connection broke mid-request (the SIGKILL)
    statuses: dict[str, int] = field(default_factory=dict)  # "503 limiter_unavailable": n
    redis_down: bool = False  # set around the Redis restart (and 1 s after it)
    unavailable_while_redis_up: int = 0  # 503 limiter_unavailable outside that window


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def seed() -> list[str]:
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from accounts.services import create_api_key, get_or_create_user
    from gateway.models import ServedModel
    from quotas.services import default_plan, set_user_quota

    ServedModel.objects.update_or_create(name=MODEL, defaults={"aliases": ["korean-qwen"]})
    keys = []
    for i in range(4):
        user, _ = get_or_create_user(f"soak-{i}")
        set_user_quota(  # 0: no limit (this measures the ledger, not the limits)
            user, default_plan(), actor=None, requests_per_minute=0, tokens_per_minute=0,
            tokens_per_hour=0, tokens_per_day=0, max_parallel_requests=0, cooldown_minutes=0,
        )  # fmt: skip
        keys.append(create_api_key(user, actor=None, name="soak")[1])
    return keys


async def client(urls: list[str], keys: list[str], tally: Tally, stop: asyncio.Event) -> None:
    rng = random.Random()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            stream = rng.random() < 0.5
            body = {
                "model": "korean-qwen",
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": rng.randint(8, 64),
                "stream": stream,
            }
            headers = {"Authorization": f"Bearer {rng.choice(keys)}"}
            url = rng.choice(urls)
            try:
                async with session.post(
                    f"{url}/v1/chat/completions", json=body, headers=headers
                ) as response:
                    rid = response.headers.get("x-request-id", "")
                    payload = await response.read()
            except aiohttp.ClientConnectorError:
                tally.refused += 1
                await asyncio.sleep(0.05)
                continue
            except (aiohttp.ClientError, TimeoutError):
                tally.sent += 1
                tally.broken += 1
                continue
            tally.sent += 1
            tally.answered[rid] = response.status
            outcome = str(response.status)
            if response.status != 200:
                outcome += " " + _error_code(payload)
                if outcome == "503 limiter_unavailable" and not tally.redis_down:
                    tally.unavailable_while_redis_up += 1
            tally.statuses[outcome] = tally.statuses.get(outcome, 0) + 1


def _error_code(payload: bytes) -> str:
    import json

    try:
        return str(json.loads(payload)["error"].get("code") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?"


async def drive(
    urls: list[str],
    keys: list[str],
    seconds: float,
    events: list[tuple[float, str, Action]],
    tally: Tally,
) -> Tally:
    stop = asyncio.Event()
    clients = [asyncio.ensure_future(client(urls, keys, tally, stop)) for _ in range(CLIENTS)]
    started = time.monotonic()
    for at, name, action in sorted(events, key=lambda e: e[0]):
        await asyncio.sleep(max(started + at - time.monotonic(), 0))
        print(f"[{time.monotonic() - started:6.1f}s] {name}", flush=True)
        await asyncio.to_thread(action)
    await asyncio.sleep(max(started + seconds - time.monotonic(), 0))
    stop.set()
    await asyncio.gather(*clients)
    return tally


def worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "limiter_site", "worker", "-B", "--pool", "solo",
         "--loglevel", "WARNING", "-s", str(log.with_suffix(".beat"))],
        cwd=ROOT, env={**os.environ, **env, "LEDGER_DRAIN_SECONDS": "0.5"},
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    seconds = args.minutes * 60
    keys = seed()
    from django.db import connection

    from quotas.models import LedgerDeadLetter, UsageRecord

    scratch = Path(tempfile.mkdtemp(prefix="soak-"))
    (scratch / "redis").mkdir()
    redis_server = RedisProcess(free_port(), scratch / "redis")
    redis_server.start()
    env = {
        "DATABASE_URL": os.environ["DATABASE_URL"],
        "REDIS_URL": redis_server.url,
        "LEDGER_SPOOL_DIR": str(scratch / "spool"),
        "LIMITER_REDIS_PREFIX": "soak",
        "EMBEDDED_BEAT": "0",
    }
    os.environ.update(env)
    with ExitStack() as stack:
        sim_port = free_port()
        sim = stack.enter_context(
            running(
                ["manage.py", "simulate_sglang", "--port", str(sim_port), "--model", MODEL,
                 "--tokens-per-second", "200", "--ttft-ms", "20"],
                f"http://127.0.0.1:{sim_port}/health",
            )
        )  # fmt: skip
        env["SGLANG_URL"] = f"http://127.0.0.1:{sim_port}"
        from gateway.models import ServedModel

        ServedModel.objects.filter(name=MODEL).update(upstream_url=env["SGLANG_URL"])
        ports = [free_port(), free_port()]
        urls = [f"http://127.0.0.1:{port}" for port in ports]

        def gateway_args(port: int) -> list[str]:
            return ["-m", "uvicorn", "--port", str(port), "--no-access-log", "--lifespan", "on",
                    "limiter_site.asgi:application"]  # fmt: skip

        gateways = [
            stack.enter_context(running(gateway_args(port), f"{url}/health", env))
            for port, url in zip(ports, urls, strict=True)
        ]
        procs: dict[str, subprocess.Popen[bytes]] = {"worker": worker(env, scratch / "w.log")}
        restarted: list[ExitStack] = []

        def restart_worker() -> None:
            stop_group(procs["worker"])
            procs["worker"] = worker(env, scratch / "w.log")

        tally = Tally()

        def restart_redis() -> None:
            tally.redis_down = True
            redis_server.stop()
            time.sleep(2)
            redis_server.start()
            time.sleep(1)  # a reply already on its way when Redis came back
            tally.redis_down = False

        def kill_gateway() -> None:
            os.kill(gateways[1].pid, signal.SIGKILL)
            gateways[1].wait()
            time.sleep(5)
            again = ExitStack()
            gateways[1] = again.enter_context(
                running(gateway_args(ports[1]), f"{urls[1]}/health", env)
            )
            restarted.append(again)

        time.sleep(10)  # warm-up without traffic: tokenizers loaded
        rss_before = {
            "gateway 1": rss_mb(gateways[0].pid), "gateway 2": rss_mb(gateways[1].pid),
            "worker": rss_mb(procs["worker"].pid), "simulator": rss_mb(sim.pid),
            "redis": rss_mb(redis_server.proc.pid if redis_server.proc else 0),
        }  # fmt: skip
        events = [
            (seconds * 0.25, "worker restart", restart_worker),
            (seconds * 0.50, "Redis SIGKILL + restart", restart_redis),
            (seconds * 0.75, "gateway 2 SIGKILL, restarted after 5 s", kill_gateway),
        ]
        asyncio.run(drive(urls, keys, seconds, events, tally))
        rss_after = {
            "gateway 1": rss_mb(gateways[0].pid), "gateway 2 (restarted)": rss_mb(gateways[1].pid),
            "worker": rss_mb(procs["worker"].pid), "simulator": rss_mb(sim.pid),
            "redis": rss_mb(redis_server.proc.pid if redis_server.proc else 0),
        }  # fmt: skip
        # Everything reaches the database: poll until the count stops moving.
        last, still = -1, 0
        while still < 10:
            count = UsageRecord.objects.count()
            still = still + 1 if count == last else 0
            last = count
            time.sleep(1)
        rows = dict(UsageRecord.objects.values_list("request_id", "status_code"))
        interrupted = UsageRecord.objects.filter(error_type="interrupted").count()
        dead = LedgerDeadLetter.objects.count()
        stop_group(procs["worker"])
        for extra in restarted:
            extra.close()
    redis_server.stop()
    connection.close()
    missing = [rid for rid in tally.answered if rid not in rows]
    wrong = [rid for rid, status in tally.answered.items() if rid in rows and rows[rid] != status]
    lines = [
        f"{args.minutes:g} minutes, {CLIENTS} clients (half streaming), 2 gateways, 1 worker; "
        "worker restart at 25 %, Redis SIGKILL + restart at 50 %, gateway SIGKILL at 75 %.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| requests sent (a gateway accepted the connection) | {tally.sent:,} |",
        f"| answered with a status | {len(tally.answered):,} "
        f"{dict(sorted(tally.statuses.items()))} |",
        f"| 503 limiter_unavailable while Redis was up | {tally.unavailable_while_redis_up} |",
        f"| broken mid-way by the SIGKILL | {tally.broken:,} |",
        f"| connections refused (gateway down) | {tally.refused:,} |",
        f"| ledger rows | {len(rows):,} (interrupted: {interrupted:,}) |",
        # Each broken request admitted before the kill has an interrupted row; one killed
        # before admission (or sent on a dead keep-alive connection) has none.
        f"| rows − answered / interrupted rows | {len(rows) - len(tally.answered)} / "
        f"{interrupted} |",
        f"| answered requests without a row / with another status | {len(missing)} / "
        f"{len(wrong)} |",
        f"| dead letters | {dead} |",
        "| RSS after warm-up → at the end (MB) | "
        + ", ".join(
            f"{name}: {before:.0f} → {after:.0f}"
            for (name, before), after in zip(rss_before.items(), rss_after.values(), strict=True)
        )
        + " |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        from bench.gateway_bench import write_section

        write_section(args.write, "soak", text)


if __name__ == "__main__":
    main()
