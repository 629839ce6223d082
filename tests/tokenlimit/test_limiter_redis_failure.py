"""Redis going away and coming back: bounded decisions, the closed/open policy, no restart.

A private redis-server process is started, killed and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.limits import GatewayLimiter
from quotas.services import KeyGrant
from tests.procs import RedisProcess, free_port
from tokenlimit.limiter import Day, LimiterUnavailable, Scope
from tokenlimit.limiter import Limits as PlanLimits
from tokenlimit.limiter_redis import RedisBackend

pytestmark = pytest.mark.redis

SHAPE = PlanLimits(10, 1000, 10_000, 100_000, 0, 5)
GRANT = KeyGrant(
    key_id=1,
    user_id=4242,
    username="x",
    limits=SHAPE,
    key_limits=None,
    expires_at=None,
    revoked=False,
)


@pytest.fixture
def redis_process(redis_url: str) -> Iterator[RedisProcess]:
    server = RedisProcess(free_port())
    server.start()
    yield server
    server.stop()


LOOP = asyncio.new_event_loop()  # redis-py's connections belong to one loop


def admit(backend: RedisBackend, now: float) -> Any:
    scopes = [Scope("u:1", SHAPE)]
    day = Day("20261124", 1000.0)
    return LOOP.run_until_complete(backend.admit(scopes, f"r{now}", 10, now, 60.0, day))


def test_dead_redis_is_reported_quickly_and_recovery_needs_no_restart(
    redis_process: RedisProcess,
) -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{redis_process.port}/0", 0.2, reply_timeout=0.2)
    now = time.time()
    assert admit(backend, now).admitted
    redis_process.stop()
    started = time.monotonic()
    with pytest.raises(LimiterUnavailable):
        admit(backend, now + 1)
    assert time.monotonic() - started < 2.0
    redis_process.start()
    assert admit(backend, now + 2).admitted  # the same backend object reconnects


def test_a_redis_that_never_answers_is_bounded_by_the_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # accept, then say nothing
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        backend = RedisBackend(
            f"redis://127.0.0.1:{listener.getsockname()[1]}/0", 0.2, reply_timeout=0.2
        )
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            admit(backend, time.time())
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.mark.parametrize("policy", ["closed", "open"])
def test_policy_when_redis_is_down(policy: str, settings: Any) -> None:
    settings.LIMITER_ON_REDIS_FAILURE = policy
    dead = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", 0.1, reply_timeout=0.1)
    limits = GatewayLimiter(dead)

    async def scenario() -> Any:
        return await limits.admit(GRANT, "rid-1", 10, "korean-qwen")

    if policy == "closed":
        with pytest.raises(GatewayError) as caught:
            asyncio.run(scenario())
        assert caught.value.status == 503 and caught.value.code == "limiter_unavailable"
    else:
        assert asyncio.run(scenario()) is None  # admitted without a decision, and logged
