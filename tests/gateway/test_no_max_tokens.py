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
CHAT = [{"role": "user", "content": "서울의 겨울 날씨를 설명해 주세요."}]


class Site:
    def __init__(self, url: str, key: str, sim: str, blocker: Any) -> None:
        self.url, self.key, self.sim, self.blocker = url, key, sim, blocker

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0)

    def row(self, request_id: str) -> Any:
        return ledger_row(self.blocker, request_id)


@pytest.fixture(scope="module")
def site(django_db_setup: None, django_db_blocker: Any) -> Iterator[Site]:
    from gateway.models import ServedModel

    with ExitStack() as stack:
        sim = stack.enter_context(simulator(MODEL, tokens_per_second=0, ttft_ms=0))
        with django_db_blocker.unblock():
            ServedModel.objects.update_or_create(name=MODEL, defaults={"upstream_url": sim})
            user, key = make_user(
                "작은요금제", tokens_per_minute=WINDOW, requests_per_minute=0, cooldown_minutes=0
            )
            database_url = database_url_for_subprocess()
        url = serve_gateway(stack, database_url, SGLANG_URL=sim)
        yield Site(url, key, sim, django_db_blocker)
    with django_db_blocker.unblock():
        ServedModel.objects.filter(name=MODEL).delete()
        user.delete()


def test_the_sdks_default_request_is_served_within_what_the_window_allows(site: Site) -> None:
    prompt = get_counter(MODEL).count_chat(CHAT)

    raw = site.client().chat.completions.with_raw_response.create(model=MODEL, messages=CHAT)
    answer = raw.parse()

    chosen = int(raw.headers["x-gateway-max-tokens"])
    assert chosen == WINDOW - prompt  # the whole free window, not the 4,096 default
    assert raw.headers["x-gateway-max-tokens-reason"] == "limit"
    sent = httpx.get(f"{site.sim}/sim/last_request").json()
    assert sent["max_tokens"] == chosen  # the reservation holds upstream
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
