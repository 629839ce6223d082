"""A model on two servers, end to end (gateway/routing.py, gateway/proxy.py): a user's requests
keep their server and the ledger row names it; a shared system prompt shares a server; a busy
server is passed over; a server killed mid-run ends its streams with an error (charged what
was generated) while new requests go to the other; restarted, it takes requests again."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest

from gateway.caches import ModelInfo
from gateway.routing import rendezvous, routing_key
from tests.gateway.conftest import (
    database_url_for_subprocess,
    ledger_row,
    make_user,
    serve_gateway,
)
from tests.procs import simulator_process, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

MODEL = "Qwen/Qwen2.5-7B-Instruct"
USERS = [f"경로-{n}" for n in range(6)]
SYSTEM = "당신은 한국어로 답하는 친절한 상담원입니다."


class Site:
    def __init__(self, url: str, blind_url: str, servers: tuple[str, str], blocker: Any) -> None:
        self.url, self.servers, self.blocker = url, servers, blocker
        # A gateway that never reads loads: it learns of a dead server only when a
        # connection is refused, and tries it again only when the ejection runs out.
        self.blind_url = blind_url
        self.keys: dict[str, str] = {}
        self.ids: dict[str, int] = {}
        self.procs: dict[str, Any] = {}
        self.model = ModelInfo(MODEL, (), servers[0], "", 32768, None, 300.0,
                               upstream_urls=servers)  # fmt: skip

    def preferred(self, user: str, fields: dict[str, Any] | None = None) -> str:
        key = routing_key(self.model, self.ids[user], fields or {})
        return rendezvous(key, self.servers)[0]

    def user_preferring(self, server: str) -> str:
        return next(user for user in USERS if self.preferred(user) == server)

    def ask(self, user: str, tokens: int = 5, system: str = "", url: str = "") -> Any:
        messages = [{"role": "user", "content": "안녕하세요"}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        client = openai.OpenAI(
            base_url=f"{url or self.url}/v1", api_key=self.keys[user], max_retries=0
        )
        return client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=tokens, messages=messages
        )

    def row(self, response: Any) -> Any:
        return ledger_row(self.blocker, response.headers["x-request-id"])


@pytest.fixture(scope="module")
def site(django_db_setup: None, django_db_blocker: Any) -> Iterator[Site]:
    from django.contrib.auth.models import User

    from gateway.models import ServedModel

    with ExitStack() as stack:
        # 100 tokens/s: a 300-token answer streams for 3 s, long enough to kill its server.
        first, first_proc = stack.enter_context(simulator_process(MODEL, 100.0))
        second, second_proc = stack.enter_context(simulator_process(MODEL, 100.0))
        with django_db_blocker.unblock():
            ServedModel.objects.update_or_create(
                name=MODEL, defaults={"upstream_url": first, "more_upstream_urls": [second]}
            )
            made = {name: make_user(name, requests_per_minute=0, cooldown_minutes=0,
                                    max_parallel_requests=0) for name in USERS}  # fmt: skip
            database_url = database_url_for_subprocess()
        url = serve_gateway(stack, database_url, SGLANG_URL=first,
                            GATEWAY_ROUTING_POLL_SECONDS="0.1")  # fmt: skip
        blind_url = serve_gateway(stack, database_url, SGLANG_URL=first,
                                  GATEWAY_ROUTING_POLL_SECONDS="3600")  # fmt: skip
        site = Site(url, blind_url, (first, second), django_db_blocker)
        site.procs = {first: first_proc, second: second_proc}
        for name, (user, key) in made.items():
            site.keys[name], site.ids[name] = key, user.id
        yield site
    with django_db_blocker.unblock():
        ServedModel.objects.filter(name=MODEL).delete()
        User.objects.filter(username__in=USERS).delete()


def test_each_user_keeps_a_server_and_the_row_names_it(site: Site) -> None:
    used = set()
    for user in USERS:
        for _ in range(2):
            response = site.ask(user)
            assert site.row(response).upstream == site.preferred(user)
        used.add(site.preferred(user))
    assert used == set(site.servers)  # the six users do not all prefer one server


def test_a_shared_system_prompt_shares_a_server(site: Site) -> None:
    fields = {"messages": [{"role": "system", "content": SYSTEM}]}
    expected = site.preferred(USERS[0], fields)
    assert expected == site.preferred(USERS[1], fields)
    # Users whose own preference differs still go to the prompt's server.
    users = [u for u in USERS if site.preferred(u) != expected][:1] + USERS[:1]
    for user in users:
        assert site.row(site.ask(user, system=SYSTEM)).upstream == expected


def test_a_busy_server_is_passed_over(site: Site) -> None:
    """Eight long answers run on the user's server for someone else (another gateway, a
    direct client): the gateway reads the server's load and sends the user to the other."""
    busy, idle = site.servers
    user = site.user_preferring(busy)
    body = {"model": MODEL, "max_tokens": 300, "messages": [{"role": "user", "content": "x"}]}
    threads = [
        threading.Thread(
            target=httpx.post,
            args=(f"{busy}/v1/chat/completions",),
            kwargs={"json": body, "timeout": 60},
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    wait_until("eight answers running on the busy server", lambda: load(busy) >= 8)
    # The gateway reads loads every 0.1 s: its next reading sends the user elsewhere.
    wait_until("the user sent to the idle server",
               lambda: site.row(site.ask(user)).upstream == idle, timeout=10)  # fmt: skip
    for thread in threads:
        thread.join(timeout=60)
    wait_until("the user back on its own server once it is idle",
               lambda: site.row(site.ask(user)).upstream == busy, timeout=10)  # fmt: skip


def load(url: str) -> int:
    return int(httpx.get(f"{url}/get_load").json()[0]["num_reqs"])


def test_a_server_killed_mid_run(site: Site) -> None:
    # The server more of the six users prefer (at least 3): a heavy and a light user on it,
    # whatever ids the users got.
    doomed, survivor = sorted(
        site.servers, key=lambda server: -sum(site.preferred(u) == server for u in USERS)
    )
    heavy = site.user_preferring(doomed)
    light = next(u for u in USERS if u != heavy and site.preferred(u) == doomed)
    streams: list[dict[str, Any]] = []
    threads = [threading.Thread(target=stream, args=(site, heavy, 300, streams)) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_until("three streams under way", lambda: len(streams) == 3 and all(
        s["pieces"] >= 20 for s in streams))  # fmt: skip
    site.procs[doomed].send_signal(signal.SIGKILL)
    site.procs[doomed].wait(timeout=10)
    for thread in threads:
        thread.join(timeout=60)
    # The streams on the dead server end with an error, billed what was generated.
    for outcome in streams:
        assert outcome["error"], outcome
        row = ledger_row(site.blocker, outcome["request_id"])
        assert row.upstream == doomed and row.status_code == 200
        assert row.error_type == "upstream_error"
        assert 20 <= row.completion_tokens < 300
    # New requests that prefer the dead server go to the other one, none fails: the gateway
    # that reads loads has ejected it or retries; the blind one retries once, then ejects it.
    for url in (site.url, site.blind_url):
        for _ in range(3):
            assert site.row(site.ask(light, url=url)).upstream == survivor
    assert retries(site.blind_url) == 1
    # Back on its port, it takes its users' requests again: at once where loads are read,
    # when the ejection runs out (5 s) on the blind gateway.
    with simulator_process(MODEL, 100.0, port=int(doomed.rsplit(":", 1)[1])):
        for url in (site.url, site.blind_url):
            wait_until("the restarted server chosen again",
                       lambda: site.row(site.ask(light, url=url)).upstream == doomed,  # noqa: B023
                       timeout=15)  # fmt: skip
    assert f'gateway_upstream_ejections_total{{upstream="{doomed}"}} 1.0' in scrape(site.blind_url)
    assert retries(site.blind_url) == 1


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", headers=monitoring()).text


def retries(url: str) -> float:
    for line in scrape(url).splitlines():
        if line.startswith(f'gateway_upstream_retries_total{{model="{MODEL}"}}'):
            return float(line.split()[-1])
    return 0.0


def monitoring() -> dict[str, str]:
    from tests.gateway.conftest import MONITORING_TOKEN

    return {"Authorization": f"Bearer {MONITORING_TOKEN}"}


def stream(site: Site, user: str, tokens: int, into: list[dict[str, Any]]) -> None:
    """A streamed request, noting its id, the pieces received and whether it ended in error."""
    outcome: dict[str, Any] = {"pieces": 0, "error": False}
    body = {"model": MODEL, "max_tokens": tokens, "stream": True,
            "messages": [{"role": "user", "content": "긴 글을 써 주세요"}]}  # fmt: skip
    headers = {"Authorization": f"Bearer {site.keys[user]}"}
    with httpx.stream("POST", f"{site.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as response:  # fmt: skip
        outcome["request_id"] = response.headers["x-request-id"]
        into.append(outcome)
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                outcome["error"] = True
            elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                outcome["pieces"] += 1
