"""Gateway vs the upstream direct, side by side in one run.

    .venv/bin/python bench/gateway_bench.py [--seconds 5] [--rounds 3] [--write docs/benchmarks.md]

Starts the SGLang simulator (as fast as it can go) and the gateway under Daphne and under
uvicorn (and, with --baseline DIR, uvicorn running another checkout) as real processes, with
auth, token counting and ledger recording switched on, then drives each with an aiohttp load
client: 1 and 32 concurrent clients (non-streaming) and
streaming time-to-first-byte. Rounds are interleaved and medians reported, because the load
client, the gateway and the simulator share this machine's cores. The gateway's CPU per request
is read from /proc for the gateway process alone.
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import free_port, running  # noqa: E402

MODEL = "Qwen/Qwen2.5-7B-Instruct"
PROMPT = [{"role": "user", "content": "서울의 오늘 날씨를 한 문장으로 알려 주세요. 고맙습니다!"}]
BODY = {"model": MODEL, "messages": PROMPT, "max_tokens": 16}


@dataclass
class Result:
    requests: int
    seconds: float
    latencies_ms: list[float]
    cpu_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, key: str | None, clients: int, seconds: float, stream: bool) -> Result:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = json.dumps({**BODY, "stream": stream}).encode()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    if stream:
                        await response.content.readany()  # time to first byte of the body
                        latencies.append((time.perf_counter() - started) * 1000)
                        await response.read()
                    else:
                        await response.read()
                        latencies.append((time.perf_counter() - started) * 1000)
                    if response.status != 200:
                        raise RuntimeError(f"{url}: HTTP {response.status}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return Result(len(latencies), time.perf_counter() - started, latencies)


UVICORN = ["-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--no-access-log",
           "--loop", "uvloop", "--http", "httptools", "limiter_site.asgi:application"]  # fmt: skip


@contextmanager
def world(
    database_url: str, redis_url: str = "", baseline: Path | None = None
) -> Iterator[dict[str, str | int]]:
    env = {"DATABASE_URL": database_url, "DEBUG": "1"}
    os.environ.update(env)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, check=True)
    key = seed()
    with ExitStack() as stack:
        sim_port = free_port()
        sim = f"http://127.0.0.1:{sim_port}"
        stack.enter_context(
            running(
                ["manage.py", "simulate_sglang", "--port", str(sim_port), "--model", MODEL,
                 "--tokens-per-second", "0", "--ttft-ms", "0"],
                f"{sim}/health", env,
            )
        )  # fmt: skip
        gateway_env = {**env, "SGLANG_URL": sim, "LOG_LEVEL": "WARNING"}
        if redis_url:  # the production limiter: shared Redis instead of the embedded one
            gateway_env.update(REDIS_URL=redis_url, LIMITER_REDIS_PREFIX=f"bench-{os.getpid()}")
        daphne_port, uvicorn_port = free_port(), free_port()
        daphne = stack.enter_context(
            running(
                ["-m", "daphne", "-b", "127.0.0.1", "-p", str(daphne_port),
                 "limiter_site.asgi:application"],
                f"http://127.0.0.1:{daphne_port}/health", gateway_env,
            )
        )  # fmt: skip
        uvicorn = stack.enter_context(
            running(
                [a.format(port=uvicorn_port) for a in UVICORN],
                f"http://127.0.0.1:{uvicorn_port}/health", gateway_env,
            )
        )  # fmt: skip
        targets: dict[str, str | int] = {
            "key": key,
            "direct": f"{sim}/v1/chat/completions",
            "daphne": f"http://127.0.0.1:{daphne_port}/v1/chat/completions",
            "uvicorn": f"http://127.0.0.1:{uvicorn_port}/v1/chat/completions",
            "daphne_pid": daphne.pid,
            "uvicorn_pid": uvicorn.pid,
        }
        if baseline is not None:
            # Another checkout (e.g. `git worktree add /tmp/before <commit>`) on the same
            # database and simulator: its cost beside ours, in the same run.
            port = free_port()
            before = stack.enter_context(
                running(
                    [a.format(port=port) for a in UVICORN],
                    f"http://127.0.0.1:{port}/health", gateway_env, cwd=baseline,
                )
            )  # fmt: skip
            targets["baseline"] = f"http://127.0.0.1:{port}/v1/chat/completions"
            targets["baseline_pid"] = before.pid
        yield targets


def seed() -> str:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
    django.setup()
    from accounts.services import create_api_key, get_or_create_user
    from gateway.models import ServedModel
    from quotas.services import default_plan, set_user_quota

    ServedModel.objects.update_or_create(name=MODEL, defaults={"aliases": ["korean-qwen"]})
    user, _ = get_or_create_user("벤치마크")
    big = 10**12
    set_user_quota(
        user, default_plan(), actor=None, requests_per_minute=10**9, tokens_per_minute=big,
        tokens_per_hour=big, tokens_per_day=big, max_parallel_requests=10**6,
    )  # fmt: skip
    return create_api_key(user, actor=None, name="bench")[1]


def measure(w: dict[str, str | int], seconds: float, rounds: int) -> dict[tuple[str, str], Result]:
    scenarios = [
        ("1 client", 1, False),
        ("32 clients", 32, False),
        ("stream TTFB, 8 clients", 8, True),
    ]
    results: dict[tuple[str, str], list[Result]] = {}
    for _ in range(rounds):
        for label, clients, stream in scenarios:
            for target in ("direct", "daphne", "uvicorn", "baseline"):
                if target not in w:
                    continue
                pid = w.get(f"{target}_pid")
                before = cpu_seconds(int(pid)) if pid else 0.0
                key = None if target == "direct" else str(w["key"])
                result = asyncio.run(load(str(w[target]), key, clients, seconds, stream))
                if pid:
                    result.cpu_ms = (cpu_seconds(int(pid)) - before) * 1000 / result.requests
                results.setdefault((label, target), []).append(result)
    return {k: median_result(v) for k, v in results.items()}


def median_result(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def table(results: dict[tuple[str, str], Result]) -> str:
    lines = [
        "| scenario | target | req/s | p50 ms | p99 ms | gateway CPU ms/req "
        "| req/s vs direct | added p50 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (label, target), r in results.items():
        direct = results[(label, "direct")]
        cpu = f"{r.cpu_ms:.2f}" if r.cpu_ms is not None else "—"
        ratio = f"{r.rps / direct.rps:.2f}×" if target != "direct" else "1×"
        added = f"{r.pct(0.5) - direct.pct(0.5):+.2f}" if target != "direct" else "—"
        lines.append(
            f"| {label} | {target} | {r.rps:,.0f} | {r.pct(0.5):.2f} | {r.pct(0.99):.2f} | {cpu} "
            f"| {ratio} | {added} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--redis-url", default="", help="limit through Redis (default: embedded)")
    parser.add_argument("--write", type=Path, help="replace the gateway section of this file")
    parser.add_argument(
        "--baseline", type=Path, help="also run uvicorn from this other checkout ('baseline')"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        database_url = args.database_url or f"sqlite:///{tmp}/bench.sqlite3"
        with world(database_url, args.redis_url, args.baseline) as w:
            results = measure(w, args.seconds, args.rounds)
    text = table(results)
    print(text)
    if args.write:
        write_section(args.write, "gateway-redis" if args.redis_url else "gateway", text)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- bench:NAME -->` markers, keeping the rest of the file."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else ""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"{start}\n_Measured {stamp} on {os.cpu_count()} cores._\n\n{body}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text + "\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
