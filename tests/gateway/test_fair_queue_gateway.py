"""The gateway's fair queue end to end: a model with two places upstream (the simulator's
GPU-like engine, two running at most), gateways sharing the queue through Redis. A light
user's request overtakes a heavy user's backlog; headroom lets another user start at once; a
plan's priority orders the queue; a plan's wait bound gives an honest 429; a client that
leaves while waiting leaves the queue; a busy user's next prompt waits for a light user's
first token. (The scheduler in one process: test_scheduling.py and test_prefill_gate.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
import redis as redis_lib
from django.conf import settings

from tests.gateway.conftest import (
    database_url_for_subprocess,
    ledger_row,
    make_user,
    serve_gateway,
)
from tests.procs import simulator, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

MODEL = "Qwen/Qwen2.5-7B-Instruct"
USERS = {"대기열-무거움": {}, "대기열-가벼움": {}, "대기열-급함": {"max_queue_seconds": 0.3},
         "대기열-우선": {"priority": 5}}  # fmt: skip


class Site:
    def __init__(
        self, url: str, sim: str, keys: dict[str, str], blocker: Any, headroom_url: str
    ) -> None:
        self.url, self.sim, self.keys, self.blocker = url, sim, keys, blocker
        self.headroom_url = headroom_url
        self.redis = redis_lib.Redis.from_url(settings.REDIS_URL)

    def waiting(self) -> int:
        return int(self.redis.zcard(self.wait_key))

    @property
    def wait_key(self) -> str:
        return f"{settings.LIMITER_REDIS_PREFIX}:fq:{{{MODEL}}}:wait"

    def client(self, user: str, url: str = "") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{url or self.url}/v1", api_key=self.keys[user], max_retries=0
        )

    def ask(self, user: str, tokens: int, url: str = "") -> Any:
        return self.client(user, url).chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=tokens, messages=[{"role": "user", "content": user}]
        )


@pytest.fixture(scope="module")
def site(django_db_setup: None, django_db_blocker: Any) -> Iterator[Site]:
    from django.contrib.auth.models import User

    from gateway.models import ServedModel
    from quotas.models import Plan

    engine = ("--engine", "gpu", "--max-running-requests", "2", "--step-base-ms", "10")
    with ExitStack() as stack:
        sim = stack.enter_context(simulator(MODEL, extra=engine))
        with django_db_blocker.unblock():
            ServedModel.objects.update_or_create(
                name=MODEL, defaults={"upstream_url": sim, "max_concurrent_requests": 2}
            )
            keys = {}
            for name, plan_fields in USERS.items():
                plan, _ = Plan.objects.update_or_create(name=name, defaults=plan_fields)
                _, keys[name] = make_user(
                    name, plan, requests_per_minute=0, cooldown_minutes=0, max_parallel_requests=0
                )
            database_url = database_url_for_subprocess()
        # The order tests need one user to fill the pool: no headroom. A second gateway, on
        # the same shared pool, keeps half of it from any one user.
        url = serve_gateway(stack, database_url, SGLANG_URL=sim, GATEWAY_QUEUE_HEADROOM="0")
        headroom_url = serve_gateway(
            stack, database_url, SGLANG_URL=sim, GATEWAY_QUEUE_HEADROOM="0.5"
        )
        yield Site(url, sim, keys, django_db_blocker, headroom_url)
    with django_db_blocker.unblock():
        ServedModel.objects.filter(name=MODEL).delete()
        User.objects.filter(username__in=list(USERS)).delete()
        Plan.objects.filter(name__in=list(USERS)).delete()


def saturate(site: Site, count: int, tokens: int) -> list[threading.Thread]:
    """The heavy user's requests: two run upstream, the rest wait in the gateway's queue."""
    threads = [
        threading.Thread(target=site.ask, args=("대기열-무거움", tokens)) for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    wait_until("the heavy backlog queued", lambda: site.waiting() == count - 2)
    return threads


def test_a_light_request_overtakes_the_heavy_backlog(site: Site) -> None:
    finished: list[str] = []
    lock = threading.Lock()

    def heavy() -> None:
        site.ask("대기열-무거움", 60)
        with lock:
            finished.append("heavy")

    threads = [threading.Thread(target=heavy) for _ in range(6)]
    for thread in threads:
        thread.start()
    wait_until("the heavy backlog queued", lambda: site.waiting() == 4)
    answer = site.ask("대기열-가벼움", 5)
    with lock:
        finished.append("light")
        heavy_done_before = finished.count("heavy")
    for thread in threads:
        thread.join(timeout=60)
    assert answer.parse().usage.completion_tokens == 5
    # First come, first served would put it after all six; the fair queue after one of them.
    assert heavy_done_before <= 2, finished
    assert site.waiting() == 0


def test_headroom_lets_another_user_start_at_once(site: Site) -> None:
    """Two places, one a user: the heavy user's three requests take one and wait for it; the
    light user's request takes the other at once and ends before any of them is served."""
    threads = [
        threading.Thread(target=site.ask, args=("대기열-무거움", 150, site.headroom_url))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    wait_until("the heavy user's two queued", lambda: site.waiting() == 2)
    answer = site.ask("대기열-가벼움", 5, site.headroom_url)
    assert answer.parse().usage.completion_tokens == 5
    assert site.waiting() == 2  # without the cap: both heavy places, and the light one waits
    for thread in threads:
        thread.join(timeout=60)
    assert site.waiting() == 0


def test_a_plans_priority_orders_the_queue(site: Site) -> None:
    """The plan's priority is the waiting entry's rank before any tag: it goes before the heavy
    user's backlog although its request is as large."""
    threads = saturate(site, 3, 150)
    urgent = threading.Thread(target=site.ask, args=("대기열-우선", 150))
    urgent.start()
    wait_until("the urgent request queued", lambda: site.waiting() == 2)
    first = site.redis.zrange(site.wait_key, 0, 0, withscores=True)
    assert first[0][1] == -5.0  # higher priority first: scored by its negation
    for thread in [*threads, urgent]:
        thread.join(timeout=60)


def test_a_plans_wait_bound_gives_an_honest_429(site: Site) -> None:
    threads = saturate(site, 4, 80)
    with pytest.raises(openai.RateLimitError) as refused:
        site.ask("대기열-급함", 5)
    response = refused.value.response
    assert response.json()["error"]["type"] == "queue"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-should-retry"] == "true"
    row = ledger_row(site.blocker, response.headers["x-request-id"])
    assert row.status_code == 429 and row.error_type == "queue"
    for thread in threads:
        thread.join(timeout=60)


def test_a_client_that_leaves_while_waiting_leaves_the_queue(site: Site) -> None:
    threads = saturate(site, 3, 150)
    assert site.waiting() == 1
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{site.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {site.keys['대기열-가벼움']}"},
            json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
            timeout=httpx.Timeout(5.0, read=0.5),
        )
    # Its entry is gone (the heavy one still waits behind the two running), and its refusal is
    # in the ledger as the client's own close.
    wait_until("the gone client's entry removed", lambda: site.waiting() <= 1)

    def closed_row() -> bool:
        from quotas.models import UsageRecord

        with site.blocker.unblock():
            return UsageRecord.objects.filter(
                user__username="대기열-가벼움", status_code=499
            ).exists()

    wait_until("the client's 499 in the ledger", closed_row)
    for thread in threads:
        thread.join(timeout=60)


HOLD_MODEL = "Qwen/Qwen2.5-7B-Instruct-hold"


def first_token_at(client: openai.OpenAI, tokens: int, into: dict[str, float], name: str) -> None:
    """Streams an answer; `into[name]`: when its first token came (monotonic)."""
    stream = client.chat.completions.create(
        model=HOLD_MODEL, max_tokens=tokens, stream=True,
        messages=[{"role": "user", "content": name}],
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and name not in into:
            into[name] = time.monotonic()


def test_a_busy_users_next_prompt_waits_for_a_light_users_first_token(site: Site) -> None:
    """gateway/prefill_gate.py's second rule through real processes (default settings): the
    server takes 0.6 s to a first token; while the light user's only request awaits its
    own, the heavy user's next request is not sent, so its first token comes at least 0.6 s
    after the light one's (sent at once, they would come together)."""
    from gateway.models import ServedModel

    with ExitStack() as stack:
        sim = stack.enter_context(simulator(HOLD_MODEL, tokens_per_second=20, ttft_ms=600))
        with site.blocker.unblock():
            ServedModel.objects.update_or_create(
                name=HOLD_MODEL, defaults={"upstream_url": sim, "max_concurrent_requests": 8}
            )
        url = serve_gateway(stack, database_url_for_subprocess(), SGLANG_URL=sim)
        firsts: dict[str, float] = {}

        def streamed(user: str, name: str, tokens: int) -> threading.Thread:
            args = (site.client(user, url), tokens, firsts, name)
            thread = threading.Thread(target=first_token_at, args=args)
            thread.start()
            return thread

        def at_server(count: int) -> Callable[[], bool]:
            return lambda: httpx.get(f"{sim}/get_load").json()[0]["num_reqs"] == count

        running = streamed("대기열-무거움", "running", 60)  # 3 s of answer after its first
        wait_until("the heavy user's first token", lambda: "running" in firsts)
        light = streamed("대기열-가벼움", "light", 5)
        wait_until("the light request at the server", at_server(2))
        heavy_next = streamed("대기열-무거움", "heavy next", 5)
        for thread in (running, light, heavy_next):
            thread.join(timeout=60)
        assert firsts["heavy next"] - firsts["light"] >= 0.45, firsts
    with site.blocker.unblock():
        ServedModel.objects.filter(name=HOLD_MODEL).delete()
