"""A plan's priority reaches SGLang's priority scheduling through the gateway: on a saturated
upstream (the simulator's GPU-like engine, one place, --enable-priority-scheduling) the
higher-priority plan's request overtakes a lower one queued before it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.gateway.conftest import database_url_for_subprocess, make_user, serve_gateway
from tests.procs import simulator, wait_until
from tests.sglang_sim.test_gpu_engine import in_engine

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

MODEL = "Qwen/Qwen2.5-7B-Instruct"
PLANS = {"우선순위-낮음": 1, "우선순위-높음": 9}
Site = tuple[str, str, dict[str, str]]  # gateway URL, simulator URL, API key by user


@pytest.fixture(scope="module")
def site(
    django_db_setup: None, django_db_blocker: Any
) -> Iterator[tuple[str, str, dict[str, str]]]:
    from gateway.models import ServedModel
    from quotas.models import Plan

    engine = ("--engine", "gpu", "--max-running-requests", "1", "--enable-priority-scheduling",
              "--step-base-ms", "10")  # fmt: skip
    with ExitStack() as stack:
        sim = stack.enter_context(simulator(MODEL, extra=engine))
        with django_db_blocker.unblock():
            ServedModel.objects.update_or_create(name=MODEL, defaults={"upstream_url": sim})
            keys = {}
            for name, priority in PLANS.items():
                plan, _ = Plan.objects.update_or_create(name=name, defaults={"priority": priority})
                _, keys[name] = make_user(name, plan, requests_per_minute=0, cooldown_minutes=0)
            database_url = database_url_for_subprocess()
        url = serve_gateway(stack, database_url, SGLANG_URL=sim)
        yield url, sim, keys
    with django_db_blocker.unblock():
        ServedModel.objects.filter(name=MODEL).delete()
        from django.contrib.auth.models import User

        User.objects.filter(username__in=list(PLANS)).delete()
        Plan.objects.filter(name__in=list(PLANS)).delete()


def test_the_higher_priority_plan_overtakes_in_the_upstream_queue(site: Site) -> None:
    url, sim, keys = site
    finished: list[str] = []

    def ask(who: str, tokens: int) -> None:
        client = OpenAI(base_url=f"{url}/v1", api_key=keys[who], max_retries=0)
        client.chat.completions.create(
            model=MODEL, max_tokens=tokens, messages=[{"role": "user", "content": who}]
        )
        finished.append(who)

    low, high = "우선순위-낮음", "우선순위-높음"
    threads = []
    # The low plan's long request holds the only place; another low one, then a high one, queue.
    for count, (who, tokens) in enumerate(((low, 200), (low, 5), (high, 5)), start=1):
        thread = threading.Thread(target=ask, args=(who, tokens))
        thread.start()
        threads.append(thread)
        wait_until("queued upstream", lambda n=count: in_engine(sim) >= n)
    for thread in threads:
        thread.join(timeout=60)
    assert finished == [low, high, low]
    sent = httpx.get(f"{sim}/sim/last_request").json()
    assert sent["priority"] == PLANS[high]
