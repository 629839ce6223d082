"""The gateway in front of a plain OpenAI-compatible server (no /health, no /metrics, no usage in
streams: what llama-cpp-python serves), played by the simulator's --kind openai-generic, and
in front of SGLang, which also has an explicit abort route."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.gateway.conftest import (
    MONITORING_TOKEN,
    database_url_for_subprocess,
    ledger_row,
    make_user,
    serve_gateway,
)
from tests.procs import simulator
from tokenlimit.tokens import get_counter

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

GENERIC = "gemma-ko"  # no tokenizer the gateway can find: it estimates
ESTIMATED_ON_SGLANG = "gemma-sglang"  # the same, on a server that can tokenize
SGLANG = "Qwen/Qwen2.5-7B-Instruct"
KOREAN: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "한국의 전통 음식 세 가지를 간단히 소개해 주세요."}
]


class Site:
    def __init__(self, url: str, key: str, user_id: int, sims: dict[str, str], blocker: Any):
        self.url, self.key, self.user_id, self.sims, self.blocker = (
            url, key, user_id, sims, blocker,
        )  # fmt: skip

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0)

    def row(self, request_id: str) -> Any:
        return ledger_row(self.blocker, request_id)


@pytest.fixture(scope="module")
def site(django_db_setup: None, django_db_blocker: Any) -> Iterator[Site]:
    from gateway.models import ServedModel
    from tokenlimit.tokens import qwen_tokenizer_dir

    qwen = str(qwen_tokenizer_dir())
    with ExitStack() as stack:
        # The "model" answers with real Qwen tokens; the gateway has no tokenizer for it.
        generic = stack.enter_context(
            simulator(
                GENERIC, tokens_per_second=0, ttft_ms=0,
                extra=("--kind", "openai-generic", "--tokenizer", qwen),
            )
        )  # fmt: skip
        sglang = stack.enter_context(simulator(SGLANG, tokens_per_second=20, ttft_ms=0))
        tokenizing = stack.enter_context(
            simulator(ESTIMATED_ON_SGLANG, 0, 0, extra=("--tokenizer", qwen))
        )
        with django_db_blocker.unblock():
            # An operator's Hangul weight far above the truth: the gateway over-counts the
            # answer, so billing within max_tokens is what the clamp, not luck, gives.
            ServedModel.objects.update_or_create(
                name=GENERIC, defaults={"upstream_url": generic, "korean_factor": 3.0}
            )
            ServedModel.objects.update_or_create(
                name=SGLANG, defaults={"upstream_url": sglang, "upstream_kind": "sglang"}
            )
            ServedModel.objects.update_or_create(
                name=ESTIMATED_ON_SGLANG, defaults={"upstream_url": tokenizing}
            )
            user, key = make_user("범용서버")
            database_url = database_url_for_subprocess()
        url = serve_gateway(stack, database_url, SGLANG_URL=generic)
        yield Site(
            url, key, user.pk,
            {"generic": generic, "sglang": sglang}, django_db_blocker,
        )  # fmt: skip
    with django_db_blocker.unblock():
        ServedModel.objects.filter(name__in=[GENERIC, SGLANG, ESTIMATED_ON_SGLANG]).delete()
        user.delete()


def ready(site: Site) -> httpx.Response:
    """/health/ready once the tokenizers have loaded (it says "starting" until then)."""
    deadline = time.monotonic() + 30
    headers = {"Authorization": f"Bearer {MONITORING_TOKEN}"}
    while True:
        response = httpx.get(f"{site.url}/health/ready", headers=headers, timeout=10)
        if response.json()["status"] != "starting" or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_readiness_is_200_with_an_upstream_that_has_no_health_route(site: Site) -> None:
    response = ready(site)

    assert response.status_code == 200, response.text
    report = response.json()
    upstreams = {u["url"]: u for u in report["upstreams"]}
    generic = upstreams[site.sims["generic"]]
    assert generic["ok"] and generic["kind"] == "openai"
    assert upstreams[site.sims["sglang"]] | {"latency_ms": 0} == {
        "url": site.sims["sglang"], "ok": True, "latency_ms": 0, "kind": "sglang",
    }  # fmt: skip
    models = {m["name"]: m for m in report["models"]}
    assert models[GENERIC]["token_counter"].startswith("estimator")
    assert models[GENERIC]["upstream_kind"] == "openai"


def test_include_usage_gets_the_gateways_count_when_the_upstream_sends_none(site: Site) -> None:
    ready(site)
    stream = site.client().chat.completions.create(
        model=GENERIC, messages=KOREAN, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)

    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert (final.model_extra or {}).get("usage_source") == "gateway"
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert text  # the answer itself came through
    row = site.row(final.id)
    assert row.usage_source == "gateway"
    assert (row.prompt_tokens, row.completion_tokens) == (
        final.usage.prompt_tokens, final.usage.completion_tokens,
    )  # fmt: skip
    # The estimator counts this Korean answer above the 40 tokens the server generated; what
    # is billed never exceeds what the request allowed.
    assert final.usage.completion_tokens == 40


def test_without_include_usage_the_stream_has_no_usage_chunk(site: Site) -> None:
    chunks = list(
        site.client().chat.completions.create(
            model=GENERIC, messages=KOREAN, max_tokens=8, stream=True
        )
    )
    assert chunks and all(c.usage is None for c in chunks)
    row = site.row(chunks[0].id)
    assert row.usage_source == "gateway" and 0 < row.completion_tokens <= 8


def test_a_whole_answer_keeps_the_upstreams_own_usage(site: Site) -> None:
    answer = site.client().chat.completions.create(model=GENERIC, messages=KOREAN, max_tokens=8)
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    assert "usage_source" not in (answer.model_extra or {})
    assert site.row(answer.id).usage_source == "upstream"


def test_a_client_leaving_an_sglang_stream_is_aborted_by_rid_too(site: Site) -> None:
    httpx.post(f"{site.sims['sglang']}/sim/reset")
    with httpx.stream(
        "POST", f"{site.url}/v1/chat/completions",
        json={"model": SGLANG, "messages": KOREAN, "max_tokens": 200, "stream": True},
        headers={"Authorization": f"Bearer {site.key}"}, timeout=30,
    ) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived: leave
    deadline = time.monotonic() + 10
    while True:
        stats = httpx.get(f"{site.sims['sglang']}/sim/stats").json()
        if stats["abort_requests"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert stats["abort_requests"] == 1 and stats["aborted"] == 1


def tokenize(site: Site, model: str, prompt: str) -> dict[str, Any]:
    response = httpx.post(
        f"{site.url}/v1/tokenize",
        json={"model": model, "prompt": prompt},
        headers={"Authorization": f"Bearer {site.key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_tokenize_asks_an_upstream_that_can_when_the_gateway_only_estimates(site: Site) -> None:
    from tokenlimit.tokens import qwen_tokenizer_dir

    ready(site)  # the "auto" upstream's kind is known
    exact = get_counter("x", str(qwen_tokenizer_dir())).encode("대한민국의 수도는", True)

    from_sglang = tokenize(site, ESTIMATED_ON_SGLANG, "대한민국의 수도는")
    assert from_sglang == {"tokens": exact, "count": len(exact), "max_model_len": 32768}

    estimated = tokenize(site, GENERIC, "대한민국의 수도는")  # a server without /v1/tokenize
    assert estimated["estimated"] is True and estimated["tokens"] == []
