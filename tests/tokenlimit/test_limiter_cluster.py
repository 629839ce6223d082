"""The limiter on a real three-node Redis Cluster (redis-server processes, tests/procs.py):
a user's keys share one hash slot so each decision is one script call on one node, users
spread over every node, and two gateways' limiters sharing the cluster admit exactly the
limit, no more and no fewer, on a loaded machine. (tests/tokenlimit/test_limiter_contract.py
runs the whole limiter contract on the cluster as well.)"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis

from tests.procs import busy_cores
from tokenlimit.limiter import Day, Limits, Scope
from tokenlimit.limiter_redis import RedisBackend, RedisReader, scope_keys

pytestmark = pytest.mark.redis
SEOUL = ZoneInfo("Asia/Seoul")
LIMITS = Limits(
    requests_per_minute=7, tokens_per_minute=0, tokens_per_hour=0, tokens_per_day=0,
    cooldown_minutes=0, max_parallel_requests=0,
)  # fmt: skip


def user_scopes(user: str) -> list[Scope]:
    return [Scope(f"u:{user}", LIMITS), Scope(f"u:{user}:k:1", LIMITS)]


def test_a_users_keys_share_a_slot_and_users_spread_over_every_node(
    redis_cluster_url: str,
) -> None:
    client = redis.RedisCluster.from_url(redis_cluster_url)
    try:
        day = Day.at(time.time(), SEOUL)
        nodes = set()
        for n in range(60):
            keys = [k for s in user_scopes(f"spread{n}") for k in scope_keys(s, day, "t")]
            slots = {client.keyslot(key) for key in keys}
            assert len(slots) == 1, keys
            nodes.add(client.get_node_from_key(keys[0]).name)
        assert len(nodes) == 3
    finally:
        client.close()


def test_two_gateways_on_the_cluster_admit_exactly_the_limit(redis_cluster_url: str) -> None:
    """Two limiters (two gateway replicas, each with its own event loop and connections), 30
    users, each user asked 10 times at once from both: exactly 7 admitted per user."""
    prefix = f"cl-{uuid.uuid4().hex[:8]}"
    users = [f"c{uuid.uuid4().hex[:6]}" for _ in range(30)]
    admitted: dict[str, int] = dict.fromkeys(users, 0)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def replica() -> None:
        async def run() -> None:
            backend = RedisBackend(redis_cluster_url, 2.0, prefix, reply_timeout=5.0,
                                   cluster=True)  # fmt: skip
            now = time.time()
            day = Day.at(now, SEOUL)

            async def ask(user: str) -> None:
                decision = await backend.admit(
                    user_scopes(user), uuid.uuid4().hex, 10, now, 60.0, day
                )
                if decision.admitted:
                    with lock:
                        admitted[user] += 1

            try:
                await asyncio.gather(*(ask(u) for u in users for _ in range(10)))
            finally:
                await backend.close()

        try:
            asyncio.run(run())
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    with busy_cores():
        threads = [threading.Thread(target=replica) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    assert admitted == dict.fromkeys(users, 7)

    # The synchronous reader (Django's pages) sees the same on the cluster.
    reader = RedisReader(redis_cluster_url, 2.0, reply_timeout=5.0, pool_size=4, cluster=True)
    try:
        now = time.time()
        readings = reader.peek(user_scopes(users[0]), now, Day.at(now, SEOUL), prefix)
    finally:
        reader.close()
    assert [r.used_requests for r in readings] == [7, 7]


@pytest.mark.django_db
def test_the_gateway_uses_the_cluster_when_configured(
    settings: Any, redis_cluster_url: str
) -> None:
    from gateway import limits

    settings.LIMITER_REDIS_URL = redis_cluster_url
    settings.LIMITER_REDIS_CLUSTER = True
    backend = limits.make_backend()
    assert isinstance(backend, RedisBackend)
    assert isinstance(backend.client, redis.asyncio.RedisCluster)
    scopes = [Scope(f"u:gw{uuid.uuid4().hex[:6]}", LIMITS)]
    now = time.time()

    async def admit_twice() -> None:
        try:
            for _ in range(2):
                decision = await backend.admit(
                    scopes, uuid.uuid4().hex, 1, now, 60.0, Day.at(now, SEOUL)
                )
                assert decision.admitted
        finally:
            await backend.close()

    asyncio.run(admit_twice())
    assert [r.used_requests for r in limits.read_live_state(scopes, now=now)] == [2]
