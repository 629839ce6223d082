"""A request without max_tokens (the openai SDK's default) on a small plan: the gateway reserves
what the windows still allow and sends that upstream as max_tokens, instead of refusing it as
"too large" for the 4,096-token default."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.gateway.conftest import (
    database_url_for_subprocess,
    ledger_row,
    make_user,
    serve_gateway,
)
from tests.procs import simulator
from tokenlimit.tokens import get_counter

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

MODEL = "Qwen/Qwen2.5-7B-Instruct"
WINDOW = 1500  # tokens a minute: far below prompt + LIMITER_DEFAULT_MAX_TOKENS (4096)
CHAT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "서울의 겨울 날씨를 설명해 주세요."}
]


# One user (so one fresh window) per test; the first test's is `keys[USERS[0]]`.
USERS = ("작은요금제", "작은요금제-스트림", "작은요금제-완성", "작은요금제-선택지")


class Site:
    def __init__(self, url: str, keys: dict[str, str], sim: str, blocker: Any) -> None:
        self.url, self.keys, self.sim, self.blocker = url, keys, sim, blocker

    def client(self, username: str = USERS[0]) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[username], max_retries=0)

    def sent_upstream(self) -> dict[str, Any]:
        """The last body the simulator received (each test waits for its own answer first)."""
        sent: dict[str, Any] = httpx.get(f"{self.sim}/sim/last_request", timeout=5).json()
        return sent

    def row(self, request_id: str) -> Any:
        return ledger_row(self.blocker, request_id)


@pytest.fixture(scope="module")
def site(django_db_setup: None, django_db_blocker: Any) -> Iterator[Site]:
    from gateway.models import ServedModel

    with ExitStack() as stack:
        sim = stack.enter_context(simulator(MODEL, tokens_per_second=0, ttft_ms=0))
        with django_db_blocker.unblock():
            ServedModel.objects.update_or_create(name=MODEL, defaults={"upstream_url": sim})
            made = {
                name: make_user(
                    name, tokens_per_minute=WINDOW, requests_per_minute=0, cooldown_minutes=0
                )
                for name in USERS
            }
            database_url = database_url_for_subprocess()
        url = serve_gateway(stack, database_url, SGLANG_URL=sim)
        yield Site(url, {name: key for name, (_, key) in made.items()}, sim, django_db_blocker)
    with django_db_blocker.unblock():
        ServedModel.objects.filter(name=MODEL).delete()
        for user, _ in made.values():
            user.delete()


def test_the_sdks_default_request_is_served_within_what_the_window_allows(site: Site) -> None:
    prompt = get_counter(MODEL).count_chat(CHAT)

    raw = site.client().chat.completions.with_raw_response.create(model=MODEL, messages=CHAT)
    answer = raw.parse()

    chosen = int(raw.headers["x-gateway-max-tokens"])
    assert chosen == WINDOW - prompt  # the whole free window, not the 4,096 default
    assert raw.headers["x-gateway-max-tokens-reason"] == "limit"
    assert site.sent_upstream()["max_tokens"] == chosen  # the reservation holds upstream
    assert answer.usage is not None and answer.usage.completion_tokens <= chosen
    row = site.row(answer.id)
    assert row.prompt_tokens + row.completion_tokens <= WINDOW

    # The window is used up: an honest 429 with the time until it frees, not "too large".
    with pytest.raises(openai.RateLimitError) as refused:
        site.client().chat.completions.create(model=MODEL, messages=CHAT)
    response = refused.value.response
    assert response.headers["x-should-retry"] == "true"
    assert 0 < float(response.headers["retry-after"]) <= 60
    assert response.json()["error"]["type"] == "tokens"


def test_an_explicit_max_tokens_is_unchanged(site: Site) -> None:
    with pytest.raises(openai.RateLimitError) as refused:
        site.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=WINDOW + 1)
    response = refused.value.response
    assert response.headers["x-should-retry"] == "false"  # larger than the whole window
    assert "x-gateway-max-tokens" not in response.headers


def test_a_stream_without_max_tokens_is_capped_the_same_way(site: Site) -> None:
    prompt = get_counter(MODEL).count_chat(CHAT)
    client = site.client(USERS[1])

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())

    chosen = int(raw.headers["x-gateway-max-tokens"])
    assert chosen == WINDOW - prompt
    assert raw.headers["x-gateway-max-tokens-reason"] == "limit"
    assert site.sent_upstream()["max_tokens"] == chosen
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens <= chosen
    row = site.row(raw.headers["x-request-id"])
    assert row.streamed and row.prompt_tokens + row.completion_tokens <= WINDOW


def test_completions_without_max_tokens_get_sglangs_default_and_the_header(site: Site) -> None:
    raw = site.client(USERS[2]).completions.with_raw_response.create(
        model=MODEL, prompt="서울의 겨울은"
    )
    answer = raw.parse()

    # SGLang's own default (16) fits the window: the gateway says so and sends it.
    assert raw.headers["x-gateway-max-tokens"] == "16"
    assert raw.headers["x-gateway-max-tokens-reason"] == "default"
    assert site.sent_upstream()["max_tokens"] == 16
    assert answer.usage is not None and answer.usage.completion_tokens <= 16


def test_several_choices_share_what_is_left(site: Site) -> None:
    prompt = get_counter(MODEL).count_chat(CHAT)

    raw = site.client(USERS[3]).chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, n=2
    )
    answer = raw.parse()

    chosen = int(raw.headers["x-gateway-max-tokens"])
    assert chosen == (WINDOW - prompt) // 2  # a choice's share: n × max_tokens fits the window
    assert site.sent_upstream()["max_tokens"] == chosen
    assert answer.usage is not None and answer.usage.completion_tokens <= 2 * chosen
