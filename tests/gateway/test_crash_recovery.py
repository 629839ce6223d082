"""A crash loses no request: admitted requests are written ahead, streams checkpoint their
output, and the spool of a dead gateway is adopted at the next start (and periodically by its
neighbours): its finished rows shipped, its open requests closed as interrupted and charged
what the last checkpoint saw, their limiter slots released at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis

from gateway.ledger import LedgerWriter, RequestFacts
from quotas.models import UsageRecord
from tests.gateway.conftest import FAST_MODEL, database_url_for_subprocess, gateway_args, make_user
from tests.procs import free_port, ledger_worker, running, simulator, wait_until
from tokenlimit.ledger_rows import INTERRUPTED

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def adopter(tmp_path: Path, settings: Any) -> Iterator[LedgerWriter]:
    settings.REDIS_URL = ""
    ledger = LedgerWriter(flush_seconds=3600, max_pending=10_000, spool_dir=tmp_path)
    yield ledger
    ledger.close()


KILLED_WRITER = """
import os, signal, sys, time, django
django.setup()
from pathlib import Path
from gateway.ledger import LedgerWriter, RequestFacts
from tokenlimit.ledger_rows import UsageRow
ledger = LedgerWriter(3600, 10_000, Path(sys.argv[1]))
now = time.time()
def opened(rid, streamed):
    scopes = [[f"u:{USER}", 0, 1000, 0, 0, 0, 8]]
    ledger.open(RequestFacts(rid, USER, KEY, "m", "chat/completions", streamed, now, 30, scopes))
opened("streaming", True)
opened("waiting", False)
opened("finished", True)
ledger.progress("streaming", 40, True)
done = UsageRow("finished", USER, KEY, "m", "chat/completions", 200, True, now, now, 30, 9)
ledger.record(done)
ledger.flush()  # shipped: the open lines live on only in the next segment
ledger.progress("streaming", 57, True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.django_db(transaction=True)
def test_open_requests_of_a_killed_writer_are_closed_as_interrupted(
    adopter: LedgerWriter, tmp_path: Path
) -> None:
    from accounts.services import create_api_key, get_or_create_user

    user, _ = get_or_create_user("중단")
    key, _ = create_api_key(user, actor=None)
    script = (
        textwrap.dedent(KILLED_WRITER).replace("USER", str(user.pk)).replace("KEY", str(key.pk))
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, check=False, timeout=60,
        env={**os.environ, "DEBUG": "1", "DJANGO_SETTINGS_MODULE": "limiter_site.settings",
             "REDIS_URL": "", "DATABASE_URL": database_url_for_subprocess()},
    )  # fmt: skip
    assert UsageRecord.objects.filter(user=user).count() == 1  # "finished", shipped before

    closed = adopter.adopt_dead()
    assert sorted((c.request_id, c.charged) for c in closed) == [
        ("streaming", 30 + 57),
        ("waiting", 30),
    ]
    assert closed[0].scopes == [[f"u:{user.pk}", 0, 1000, 0, 0, 0, 8]]
    assert adopter.adopt_dead() == []  # nothing is adopted twice
    adopter.flush()
    rows = {r.request_id: r for r in UsageRecord.objects.filter(user=user)}
    assert set(rows) == {"streaming", "waiting", "finished"}
    streaming, waiting = rows["streaming"], rows["waiting"]
    assert (streaming.status_code, streaming.completion_tokens, streaming.prompt_tokens) == (
        200,
        57,
        30,
    )
    assert (waiting.status_code, waiting.completion_tokens) == (502, 0)
    for row in (streaming, waiting):
        assert row.error_type == INTERRUPTED and row.usage_source == "checkpoint"
    assert rows["finished"].error_type == ""
    assert not [
        p for p in tmp_path.iterdir() if p.suffix in (".ready", ".lock") and p.stat().st_size
    ]


@pytest.mark.django_db  # the adopted request's row is written when the adopter closes
def test_a_reused_pid_does_not_hide_a_dead_writer(adopter: LedgerWriter, tmp_path: Path) -> None:
    """In a container every gateway is PID 1: a dead writer's PID is often a live process's.
    Its lock decides, not its PID."""
    owner = f"{socket.gethostname()}~{os.getpid()}~deadbeef"
    (tmp_path / f"{owner}.lock").write_text("")  # nobody holds it
    request = RequestFacts("same-pid", 1, 1, "m", "chat/completions", True, time.time(), 12, [])
    line = json.dumps({"open": asdict(request)})
    (tmp_path / f"{owner}~1.open").write_text(line + "\n")
    closed = adopter.adopt_dead()
    assert [c.request_id for c in closed] == ["same-pid"]
    live_owner = adopter._spool.name if adopter._spool else ""
    assert (tmp_path / f"{live_owner}.lock").exists()  # the adopter's own lock stays


@pytest.mark.django_db(transaction=True)
def test_a_running_gateway_adopts_a_neighbour_that_died(settings: Any, tmp_path: Path) -> None:
    """Adoption is not only at start: a gateway on the same host picks up a dead neighbour's
    spool within GATEWAY_LEDGER_ADOPT_SECONDS, without restarting or serving a request."""
    from gateway.app import Gateway

    settings.REDIS_URL = ""
    settings.LEDGER_SPOOL_DIR = tmp_path
    settings.GATEWAY_LEDGER_ADOPT_SECONDS = 0.1
    settings.GATEWAY_LEDGER_FLUSH_SECONDS = 0.1
    gateway = Gateway()

    async def scenario() -> None:
        await gateway._lifespan_startup()
        try:
            owner = f"{socket.gethostname()}~999999~neighbour"
            request = RequestFacts("neighbour", 1, 1, "m", "chat/completions", True, time.time(), 9)
            line = json.dumps({"open": asdict(request)}) + "\n"
            (tmp_path / f"{owner}~1.open").write_text(line)
            (tmp_path / f"{owner}.lock").write_text("")  # its writer is gone: nobody holds it
            found = await asyncio.to_thread(
                wait_until,
                "the neighbour's open request closed",
                lambda: UsageRecord.objects.filter(request_id="neighbour").first(),
                10,
                0.05,
            )
            assert found.error_type == INTERRUPTED and found.prompt_tokens == 9
        finally:
            await gateway.close()

    asyncio.run(scenario())


STREAMS = 8


async def open_streams(
    url: str, key: str, seen: dict[str, int], streaming: asyncio.Event
) -> list[str]:
    """Start STREAMS long streams; count the content events each has received; set
    `streaming` once every stream has received 15."""
    body = {
        "model": "slow-qwen",
        "messages": [{"role": "user", "content": "긴 이야기를 들려주세요."}],
        "max_tokens": 300,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    session = aiohttp.ClientSession()
    outcomes: list[str] = []

    async def one() -> None:
        try:
            async with session.post(
                f"{url}/v1/chat/completions", json=body, headers=headers
            ) as response:
                assert response.status == 200, await response.text()
                rid = response.headers["x-request-id"]
                seen[rid] = 0
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        seen[rid] += 1
                        if len(seen) == STREAMS and min(seen.values()) >= 15:
                            streaming.set()
            outcomes.append("clean end")
        except aiohttp.ClientError as exc:
            outcomes.append(type(exc).__name__)

    tasks = [asyncio.ensure_future(one()) for _ in range(STREAMS)]
    await asyncio.gather(*tasks)
    await session.close()
    return outcomes


def last_checkpoints(spool: Path) -> dict[str, int]:
    checkpoints: dict[str, int] = {}
    for path in spool.glob("*.open"):
        for line in path.read_text().splitlines():
            if line.startswith('{"progress"'):
                record = json.loads(line)
                checkpoints[record["progress"]] = record["tokens"]
    return checkpoints


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_gateway_killed_during_streams_bills_them_and_frees_the_slots(
    tmp_path: Path, redis_url: str
) -> None:
    user, key = make_user("스트림중단", max_parallel_requests=STREAMS, cooldown_minutes=0)
    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "spool"
    with ExitStack() as stack:
        upstream = stack.enter_context(simulator(FAST_MODEL, tokens_per_second=25, ttft_ms=10))
        from gateway.models import ServedModel

        ServedModel.objects.create(name=FAST_MODEL, aliases=["slow-qwen"], upstream_url=upstream)
        env = {
            "DATABASE_URL": database_url_for_subprocess(),
            "REDIS_URL": redis_url,
            "LIMITER_REDIS_PREFIX": prefix,
            "LEDGER_SPOOL_DIR": str(spool),
            "GATEWAY_LEDGER_FLUSH_SECONDS": "0.1",
            "GATEWAY_LEDGER_CHECKPOINT_SECONDS": "0.25",
        }
        stack.enter_context(ledger_worker(env))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        seen: dict[str, int] = {}
        with running(gateway_args(port), f"{url}/health", env) as gateway:

            async def kill_when_streaming() -> list[str]:
                streaming = asyncio.Event()
                clients = asyncio.ensure_future(open_streams(url, key, seen, streaming))
                await asyncio.wait_for(streaming.wait(), 60)
                os.kill(gateway.pid, signal.SIGKILL)
                return await clients

            outcomes = asyncio.run(kill_when_streaming())
            gateway.wait()
        # The clients learn that their streams broke; nothing pretends they ended.
        assert len(outcomes) == STREAMS and "clean end" not in outcomes, outcomes
        checkpoints = last_checkpoints(spool)
        assert set(checkpoints) == set(seen) and min(checkpoints.values()) > 0
        slots = redis.Redis.from_url(redis_url)
        parallel_key = f"{prefix}:{{u:{user.pk}}}:p"
        assert slots.zcard(parallel_key) == STREAMS  # held until their 60 s leases run out...

        restarted = time.monotonic()
        with running(gateway_args(port), f"{url}/health", env):
            # ...or until the next gateway adopts the spool, at its start.
            wait_until("slots released", lambda: slots.zcard(parallel_key) == 0, 10, every=0.05)
            released_after = time.monotonic() - restarted
            rows = wait_until(
                "8 ledger rows",
                lambda: list(UsageRecord.objects.filter(user=user)) if
                UsageRecord.objects.filter(user=user).count() == STREAMS else None,
                15, every=0.05,
            )  # fmt: skip
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "slow-qwen", "messages": [{"role": "user", "content": "안녕"}],
                      "max_tokens": 2},
                headers={"Authorization": f"Bearer {key}"}, timeout=30,
            )  # fmt: skip
            assert answer.status_code == 200  # the user may use all 8 slots again at once
        day_used = sum(
            int(slots.get(k) or 0) for k in slots.scan_iter(f"{prefix}:{{u:{user.pk}}}:d:*")
        )
        slots.close()
    assert released_after < 10
    by_id = {row.request_id: row for row in rows}
    assert set(by_id) == set(seen)
    for rid, row in by_id.items():
        assert row.error_type == INTERRUPTED and row.usage_source == "checkpoint"
        assert row.status_code == 200 and row.prompt_tokens > 0
        assert checkpoints[rid] <= row.completion_tokens <= seen[rid]
    # The limiter's day counter holds what the ledger bills (plus the one request after).
    billed = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert billed < day_used <= billed + 200
