"""One of a model's two servers killed mid-run (issue 15): who fails, and what is billed.

    .venv/bin/python bench/failover_bench.py [--seconds 20] [--heavy 32]

Two GPU-like simulators (sglang_sim/engine.py, `--max-running-requests 64` each) serve one
model through one gateway (uvicorn, SQLite, embedded limiter; gateway/routing.py picks the
server). A heavy user keeps `--heavy` long streaming requests in flight (bench/
fairness_bench.py's), 4 light users send short ones; halfway through, the first server is
killed (SIGKILL): the one most of the light users' requests prefer (gateway/routing.py's
rendezvous order for their user keys), so that the kill hits them. Reported:

- light requests: sent before and after the kill, failed, and which server answered;
- the heavy user's requests that were on the killed server: each must end with an error, and
  its ledger row must bill the tokens the client received (what was generated), no more;
- requests sent after the kill that failed (every one should go to the surviving server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import django

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fairness_bench import HEAVY_PROMPT, LIGHT_PROMPT, MODEL, gateway  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
os.environ.setdefault("DEBUG", "1")
django.setup()  # gateway.routing reads settings: the router's own order, not a copy of it

from gateway.routing import rendezvous  # noqa: E402
from tests.procs import simulator_process  # noqa: E402


@dataclass
class Request:
    user: str
    started: float
    request_id: str = ""
    pieces: int = 0
    status: int = 0
    error: bool = False


@dataclass
class Run:
    requests: list[Request] = field(default_factory=list)
    killed_at: float = 0.0


async def stream(session: aiohttp.ClientSession, url: str, key: str, user: str, prompt: str,
                 tokens: int, run: Run) -> None:  # fmt: skip
    request = Request(user, time.monotonic())
    run.requests.append(request)
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "stream": True}  # fmt: skip
    try:
        headers = {"Authorization": f"Bearer {key}"}
        async with session.post(
            f"{url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            request.status = response.status
            request.request_id = response.headers.get("x-request-id", "")
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    request.error = True
                elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                    request.pieces += 1
    except aiohttp.ClientError:
        request.error = True
    if request.status != 200:
        request.error = True


async def drive(url: str, keys: dict[str, str], seconds: float, heavy: int,
                victim: subprocess.Popen[bytes], run: Run) -> None:  # fmt: skip
    until = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=600)

    async def light(n: int) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < until:
                await stream(session, url, keys[f"light{n}"], f"light{n}", LIGHT_PROMPT, 32, run)
                await asyncio.sleep(0.3)

    async def heavy_lanes() -> None:
        connector = aiohttp.TCPConnector(limit=heavy)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def lane() -> None:
                while time.monotonic() < until:
                    prompt = f"{uuid.uuid4()}: {HEAVY_PROMPT}"
                    await stream(session, url, keys["heavy"], "heavy", prompt, 256, run)

            await asyncio.gather(*(lane() for _ in range(heavy)))

    async def kill() -> None:
        await asyncio.sleep(seconds / 2)
        run.killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)

    await asyncio.gather(heavy_lanes(), kill(), *(light(n) for n in range(4)))


def ledger(database: Path) -> dict[str, tuple[int, str, str, int]]:
    """request id -> (completion tokens, upstream, error type, status) from the gateway's DB."""
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT request_id, completion_tokens, upstream, error_type, status_code "
            "FROM quotas_usagerecord"
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def light_users_server(database: Path, servers: tuple[str, str]) -> str:
    """The server most light users' requests go to (no system prompt: keyed by user)."""
    with sqlite3.connect(database) as db:
        ids = [row[0] for row in db.execute(
            "SELECT id FROM auth_user WHERE username LIKE 'light%'")]  # fmt: skip
    preferred = [rendezvous(f"u:{user_id}", servers)[0] for user_id in ids]
    return max(servers, key=preferred.count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--heavy", type=int, default=32)
    options = parser.parse_args()
    engine = ("--engine", "gpu", "--max-running-requests", "64")
    run = Run()
    with (
        simulator_process(MODEL, extra=engine) as (first, first_proc),
        simulator_process(MODEL, extra=engine) as (second, second_proc),
        gateway(first, 0, more_upstreams=[second]) as (url, keys, database),
    ):
        doomed = light_users_server(database, (first, second))
        survivor = second if doomed == first else first
        victim = first_proc if doomed == first else second_proc
        asyncio.run(drive(url, keys, options.seconds, options.heavy, victim, run))
        deadline = time.monotonic() + 30  # the gateway's ledger lands in its database
        while time.monotonic() < deadline:
            rows = ledger(database)
            if all(r.request_id in rows for r in run.requests if r.request_id):
                break
            time.sleep(0.2)
    report(run, rows, doomed, survivor)


def report(run: Run, rows: dict[str, tuple[int, str, str, int]], doomed: str,
           survivor: str) -> None:  # fmt: skip
    def server(request: Request) -> str:
        upstream = rows.get(request.request_id, (0, "", "", 0))[1]
        return {doomed: "killed", survivor: "survivor"}.get(upstream, upstream or "-")

    print("| class | when sent | requests | failed | on killed server | on survivor |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for kind in ("light", "heavy"):
        for label, picked in (
            ("before the kill", [r for r in run.requests if r.started < run.killed_at]),
            ("after the kill", [r for r in run.requests if r.started >= run.killed_at]),
        ):
            mine = [r for r in picked if r.user.startswith(kind)]
            print(f"| {kind} | {label} | {len(mine)} | {sum(r.error for r in mine)} | "
                  f"{sum(server(r) == 'killed' for r in mine)} | "
                  f"{sum(server(r) == 'survivor' for r in mine)} |")  # fmt: skip
    cut = [r for r in run.requests if r.started < run.killed_at and server(r) == "killed"
           and r.error]  # fmt: skip
    received = sum(r.pieces for r in cut)
    billed = sum(rows[r.request_id][0] for r in cut)
    over = [r for r in cut if rows[r.request_id][0] > r.pieces]
    print()
    print(f"requests cut by the kill: {len(cut)} ({sum(r.user == 'heavy' for r in cut)} heavy, "
          f"{sum(r.pieces > 0 for r in cut)} after their first tokens); "
          f"tokens the clients received {received:,}, billed {billed:,}; billed more than "
          f"received: {len(over)}")  # fmt: skip


if __name__ == "__main__":
    main()
