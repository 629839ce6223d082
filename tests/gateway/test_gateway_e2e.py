"""End to end: the official `openai` SDK → uvicorn running the gateway → the SGLang simulator.

Every process is real (see conftest.py); only the GPU is simulated.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import FAST_MODEL, MONITORING_TOKEN, World
from tokenlimit.tokens import get_counter

pytestmark = pytest.mark.slow

KOREAN_CHAT = [
    {"role": "system", "content": "당신은 친절한 한국어 도우미입니다."},
    {
        "role": "user",
        "content": "서울의 오늘 날씨를 알려 주세요. 그리고 점심 메뉴도 추천해 주세요.",
    },
]


def sdk(world: World, key: str | None = None, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=world.v1, api_key=key or world.keys["dev"], max_retries=0, **kwargs
    )


def post(world: World, path: str, body: object, key: str | None = "dev", **kw: object):
    headers = {"Authorization": f"Bearer {world.keys[key]}"} if key else {}
    return httpx.post(f"{world.v1}{path}", json=body, headers=headers, timeout=30, **kw)


def metric(upstream: str, name: str) -> float:
    text = httpx.get(f"{upstream}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def test_model_list_shows_served_names_and_aliases(world: World) -> None:
    ids = {m.id for m in sdk(world).models.list()}
    assert {FAST_MODEL, "korean-qwen", "slow-qwen"} <= ids


def test_model_list_honours_the_plans_allowed_models(world: World) -> None:
    ids = {m.id for m in sdk(world, world.keys["restricted"]).models.list()}
    assert ids == {FAST_MODEL, "korean-qwen"}
    with pytest.raises(openai.NotFoundError):
        sdk(world, world.keys["restricted"]).chat.completions.create(
            model="slow-qwen", messages=KOREAN_CHAT, max_tokens=5
        )


def test_chat_through_sdk_is_billed_what_the_tokenizer_counts(world: World) -> None:
    response = sdk(world).chat.completions.with_raw_response.create(
        model="korean-qwen", messages=KOREAN_CHAT, max_tokens=12
    )
    completion = response.parse()
    expected_prompt = get_counter(FAST_MODEL).count_chat(KOREAN_CHAT)
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected_prompt
    assert completion.usage.completion_tokens == 12
    row = world.ledger_row(response.headers["x-request-id"])
    assert row.prompt_tokens == expected_prompt == row.estimated_prompt_tokens
    assert row.completion_tokens == 12
    assert row.status_code == 200 and not row.streamed
    assert row.usage_source == "upstream"
    assert row.model == FAST_MODEL and row.user.username == "한국어개발자"
    assert row.upstream_latency_ms is not None


def test_stream_without_usage_request_hides_the_usage_chunk(world: World) -> None:
    stream = sdk(world).chat.completions.with_raw_response.create(
        model="korean-qwen", messages=KOREAN_CHAT, max_tokens=8, stream=True
    )
    chunks = list(stream.parse())
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    content_chunks = [c for c in chunks if c.choices[0].delta.content]
    assert len(content_chunks) == 8
    row = world.ledger_row(stream.headers["x-request-id"])
    assert row.streamed and row.completion_tokens == 8
    assert row.prompt_tokens == get_counter(FAST_MODEL).count_chat(KOREAN_CHAT)
    assert row.usage_source == "upstream"
    assert row.time_to_first_token_ms is not None


def test_stream_with_usage_request_keeps_the_usage_chunk_and_done(world: World) -> None:
    body = {
        "model": "korean-qwen",
        "messages": KOREAN_CHAT,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {world.keys['dev']}"}
    with httpx.stream("POST", f"{world.v1}/chat/completions", json=body, headers=headers) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5


def test_completions_endpoint(world: World) -> None:
    completion = sdk(world).completions.create(
        model="korean-qwen", prompt="대한민국의 수도는", max_tokens=4
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == get_counter(FAST_MODEL).count_text("대한민국의 수도는")
    assert completion.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_api_key"),
        ("Bearer sk-not-a-real-key-0000000000", "invalid_api_key"),
        ("Basic dXNlcjpwYXNz", "invalid_api_key"),
        ("Bearer", "invalid_api_key"),
    ],
)
def test_bad_keys_are_401_in_openai_shape(
    world: World, authorization: str | None, code: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.post(
        f"{world.v1}/chat/completions",
        json={"model": "korean-qwen", "messages": KOREAN_CHAT},
        headers=headers,
    )
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code


def test_sdk_sees_authentication_error(world: World) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk(world, "sk-wrong").chat.completions.create(model="korean-qwen", messages=KOREAN_CHAT)


def test_revoked_key_stops_working_within_five_seconds(world: World) -> None:
    from accounts.models import ApiKey
    from accounts.services import hash_key, revoke_api_keys

    from .conftest import make_user

    with world.db():
        _, raw = make_user("revoked-soon")
    client = sdk(world, raw)
    client.models.list()  # now cached in the gateway
    with world.db():
        revoke_api_keys(list(ApiKey.objects.filter(key_hash=hash_key(raw))), actor=None)
    revoked_at = time.monotonic()
    while True:
        try:
            client.models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() - revoked_at < 5.0, "revoked key still accepted after 5 s"
        time.sleep(0.2)


def test_expired_key_is_401(world: World) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from accounts.services import create_api_key, get_or_create_user

    with world.db():
        user, _ = get_or_create_user("expired-key-user")
        _, raw = create_api_key(user, actor=None, expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(openai.AuthenticationError):
        sdk(world, raw).models.list()


def test_sdk_sees_bad_request_for_empty_messages(world: World) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(world).chat.completions.create(model="korean-qwen", messages=[])
    assert caught.value.body["param"] == "messages"  # type: ignore[index]


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b'"text"', b"\xff\xfe", b'{"model": 5, "messages": []}'],
)
def test_malformed_bodies_are_400_without_traceback(world: World, raw: bytes) -> None:
    response = httpx.post(
        f"{world.v1}/chat/completions",
        content=raw,
        headers={
            "Authorization": f"Bearer {world.keys['dev']}",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in response.text


def test_unknown_model_is_404_model_not_found(world: World) -> None:
    response = post(world, "/chat/completions", {"model": "gpt-17", "messages": KOREAN_CHAT})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_oversized_body_is_413(world: World) -> None:
    big = "가" * (300 * 1024 // 3)
    response = post(
        world,
        "/chat/completions",
        {"model": "korean-qwen", "messages": [{"role": "user", "content": big}]},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unknown_path_and_wrong_method(world: World) -> None:
    assert httpx.get(f"{world.v1}/nothing-here").status_code == 404
    response = httpx.get(f"{world.v1}/chat/completions")
    assert response.status_code == 405
    assert "error" in response.json()


def test_upstream_flat_error_is_rewritten_with_same_status(world: World) -> None:
    body = {"model": "korean-qwen", "messages": KOREAN_CHAT, "sim": {"status": 400}}
    response = post(world, "/chat/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    row = world.ledger_row(response.headers["x-request-id"])
    assert row.status_code == 400 and row.completion_tokens == 0


def test_upstream_down_is_502(world: World) -> None:
    response = post(world, "/chat/completions", {"model": "dead-model", "messages": KOREAN_CHAT})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"
    row = world.ledger_row(response.headers["x-request-id"])
    assert row.status_code == 502 and row.prompt_tokens == 0 and row.usage_source == "none"


def test_upstream_timeout_is_504(world: World) -> None:
    body = {"model": "impatient-model", "messages": KOREAN_CHAT, "sim": {"delay_ms": 3000}}
    response = post(world, "/chat/completions", body)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_upstream_without_stream_usage_is_counted_by_the_gateway(world: World) -> None:
    """The llama.cpp server sends no usage in streams: the gateway counts the completion."""
    body = {
        "model": "korean-qwen",
        "messages": KOREAN_CHAT,
        "max_tokens": 9,
        "stream": True,
        "sim": {"no_usage": True},
    }
    headers = {"Authorization": f"Bearer {world.keys['dev']}"}
    with httpx.stream("POST", f"{world.v1}/chat/completions", json=body, headers=headers) as r:
        request_id = r.headers["x-request-id"]
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in r.iter_lines()
            if line.startswith("data: {")
        )
    row = world.ledger_row(request_id)
    assert row.usage_source == "gateway"
    assert row.completion_tokens == get_counter(FAST_MODEL).count_text(text) == 9
    assert row.prompt_tokens == get_counter(FAST_MODEL).count_chat(KOREAN_CHAT)


def test_client_disconnect_aborts_upstream_within_a_second_and_is_recorded(world: World) -> None:
    aborted_before = metric(world.slow_upstream, "sglang:num_aborted_requests_total")
    body = json.dumps(
        {"model": "slow-qwen", "messages": KOREAN_CHAT, "max_tokens": 500, "stream": True}
    ).encode()
    host, port = world.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {world.keys['user1']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    received = b""
    while received.count(b'"content"') < 4:  # a few tokens at 20 tokens/s
        received += sock.recv(65536)
    match = re.search(rb"(?i)x-request-id: *(\w+)", received)
    assert match is not None, received[:500]
    request_id = match.group(1).decode()
    sock.close()
    closed_at = time.monotonic()
    while metric(world.slow_upstream, "sglang:num_aborted_requests_total") <= aborted_before:
        assert time.monotonic() - closed_at < 1.0, "upstream still generating 1 s after disconnect"
        time.sleep(0.05)
    row = world.ledger_row(request_id)
    assert row.client_disconnected and row.streamed
    assert 3 <= row.completion_tokens < 100
    assert row.usage_source == "gateway"
    assert row.prompt_tokens == get_counter(FAST_MODEL).count_chat(KOREAN_CHAT)


def monitoring() -> dict[str, str]:
    return {"Authorization": f"Bearer {MONITORING_TOKEN}"}


def test_readiness_reports_every_part_to_monitoring(world: World) -> None:
    deadline = time.monotonic() + 30
    while True:  # the tokenizer loads in the background from the first catalog load
        response = httpx.get(f"{world.url}/health/ready", headers=monitoring())
        report = response.json()
        loaded = all(m["token_counter"] != "loading" for m in report["models"])
        if loaded or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert report["database"]["ok"] is True
    assert report["redis"]["ok"] is (True if os.environ.get("REDIS_URL") else None)
    by_url = {u["url"]: u["ok"] for u in report["upstreams"]}
    assert by_url[world.fast_upstream] is True
    assert by_url[world.dead_upstream] is False  # dead-model's upstream is down
    assert response.status_code == 200 and report["status"] == "degraded"
    counters = {m["name"]: m["token_counter"] for m in report["models"]}
    assert counters[FAST_MODEL].startswith("tokenizer")
    assert response.headers["cache-control"] == "no-store"


def test_readiness_is_for_monitoring_and_staff_only(world: World) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    anonymous = httpx.get(f"{world.url}/health/ready")
    assert anonymous.status_code == 403 and anonymous.json()["error"]["code"] == (
        "monitoring_forbidden"
    )
    wrong = httpx.get(f"{world.url}/health/ready", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    with world.db():
        staff = User.objects.create_user("health-staff", password="x", is_staff=True)
        plain = User.objects.create_user("health-plain", password="x")
        cookies = {}
        for user in (staff, plain):
            client = Client()
            client.force_login(user)
            cookies[user.username] = client.cookies["sessionid"].value
    try:
        as_staff = httpx.get(
            f"{world.url}/health/ready", cookies={"sessionid": cookies["health-staff"]}
        )
        assert as_staff.status_code == 200 and "upstreams" in as_staff.json()
        as_plain = httpx.get(
            f"{world.url}/health/ready", cookies={"sessionid": cookies["health-plain"]}
        )
        assert as_plain.status_code == 403
    finally:
        with world.db():
            User.objects.filter(username__in=["health-staff", "health-plain"]).delete()


def test_liveness_is_anonymous_cheap_and_says_nothing(world: World) -> None:
    response = httpx.get(f"{world.url}/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert response.content == b'{"status":"ok"}'  # no URL, path, vendor or version
    head = httpx.head(f"{world.url}/health")
    assert head.status_code == 200 and head.content == b""


def counting_listener() -> tuple[int, list[int], Any]:
    """A TCP port that counts the connections made to it (and answers nothing)."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = [0]

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted[0] += 1
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1], accepted, server


def test_liveness_needs_neither_database_nor_redis_and_readiness_says_why(tmp_path) -> None:
    """A gateway whose database is unreachable and whose Redis is a port that only counts
    connections: 1,000 liveness answers open none (each used to open one and query the
    database), beyond the one start-up check; readiness is 503 and names the database."""
    from tests.gateway.conftest import gateway_args
    from tests.procs import free_port, running

    redis_port, accepted, listener = counting_listener()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/missing-dir/db.sqlite3",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SGLANG_URL": "http://127.0.0.1:9",
        "GATEWAY_MONITORING_TOKEN": MONITORING_TOKEN,
    }
    try:
        with running(gateway_args(port), f"{url}/health", env):
            # One connection at start-up: the check that Redis keeps its append-only file.
            deadline = time.monotonic() + 15
            while accepted[0] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert accepted[0] == 1
            with httpx.Client(base_url=url) as client:
                for _ in range(1000):
                    assert client.get("/health").json() == {"status": "ok"}
            assert accepted[0] == 1  # none for liveness
            response = httpx.get(f"{url}/health/ready", headers=monitoring(), timeout=20)
    finally:
        listener.close()
    assert response.status_code == 503
    report = response.json()
    assert report["status"] == "unavailable" and report["database"]["ok"] is False
    assert report["redis"]["ok"] is False


def test_tokenize_counts_like_the_upstream_bills_and_is_recorded_unbilled(world: World) -> None:
    chat = post(world, "/tokenize", {"model": "korean-qwen", "messages": KOREAN_CHAT})
    body = chat.json()
    assert body["count"] == len(body["tokens"]) == get_counter(FAST_MODEL).count_chat(KOREAN_CHAT)
    assert body["max_model_len"] == 32768 and "estimated" not in body
    upstream = httpx.post(
        f"{world.fast_upstream}/v1/tokenize",
        json={"model": FAST_MODEL, "messages": KOREAN_CHAT},
        timeout=10,
    ).json()
    assert upstream["tokens"] == body["tokens"]
    text = post(world, "/tokenize", {"model": "korean-qwen", "prompt": "대한민국의 수도는"}).json()
    assert text["count"] == get_counter(FAST_MODEL).count_text("대한민국의 수도는")
    row = world.ledger_row(chat.headers["x-request-id"])
    assert (row.endpoint, row.status_code, row.usage_source) == ("tokenize", 200, "none")
    assert row.prompt_tokens == row.completion_tokens == 0  # recorded, never billed
    assert row.estimated_prompt_tokens == body["count"]
    assert "x-ratelimit-remaining-requests" in chat.headers


def test_tokenize_is_rate_limited_in_requests(world: World) -> None:
    from tests.gateway.conftest import hooks_plan, make_user

    with world.db():
        _, key = make_user("tokenize-rpm", hooks_plan(), requests_per_minute=2, cooldown_minutes=0)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "korean-qwen", "prompt": "안녕"}
    statuses = [
        httpx.post(f"{world.v1}/tokenize", json=body, headers=headers, timeout=10).status_code
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "korean-qwen"},
        {"model": "korean-qwen", "prompt": "a", "messages": KOREAN_CHAT},
        {"model": "korean-qwen", "prompt": 5},
        {"model": "korean-qwen", "messages": []},
        {"messages": KOREAN_CHAT},
    ],
)
def test_tokenize_bad_input_is_400(world: World, body: dict) -> None:
    response = post(world, "/tokenize", body)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_tokenize_needs_a_key(world: World) -> None:
    response = post(world, "/tokenize", {"model": "korean-qwen", "prompt": "a"}, key=None)
    assert response.status_code == 401


def test_the_same_application_serves_under_uvicorn(world: World) -> None:
    from tests.gateway.conftest import database_url_for_subprocess
    from tests.procs import free_port, running

    with world.db():
        env = {"DATABASE_URL": database_url_for_subprocess(), "SGLANG_URL": world.fast_upstream}
    port = free_port()
    args = ["-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"]
    args += ["--http", "httptools", "--lifespan", "on", "limiter_site.asgi:application"]
    with running(args, f"http://127.0.0.1:{port}/health", env) as proc:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=world.keys["dev"], max_retries=0
        )
        reply = client.chat.completions.create(
            model="korean-qwen", messages=KOREAN_CHAT, max_tokens=4
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        chunks = list(
            client.chat.completions.create(
                model="korean-qwen", messages=KOREAN_CHAT, max_tokens=4, stream=True
            )
        )
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 4
    # uvicorn re-raises the SIGTERM it handled, after the lifespan shutdown closed the pool.
    assert proc.returncode in (0, -15)


def gateway_metrics(
    base_url: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(
        f"{base_url}/metrics", timeout=5, headers=monitoring() if headers is None else headers
    )
    assert response.status_code == 200, response.text
    text = response.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_gateway_metrics_count_requests_tokens_and_refusals(world: World) -> None:
    before = gateway_metrics(world.url)
    reply = sdk(world).chat.completions.create(
        model="korean-qwen", messages=KOREAN_CHAT, max_tokens=5
    )
    post(world, "/chat/completions", {"model": "gpt-17", "messages": KOREAN_CHAT})
    # A request is counted when it is settled, just after its response went out.
    time.sleep(0.2)
    after = gateway_metrics(world.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("gateway_requests_total", model=FAST_MODEL, status="200") == 1
    assert delta("gateway_requests_total", model="", status="404") == 1
    assert reply.usage is not None
    assert (
        delta("gateway_tokens_total", model=FAST_MODEL, direction="prompt")
        == reply.usage.prompt_tokens
    )
    assert delta("gateway_tokens_total", model=FAST_MODEL, direction="completion") == 5
    assert delta("gateway_limiter_decision_seconds_count") == 1
    assert ("gateway_requests_in_flight", ()) in after
    assert not any("user" in dict(labels) for _, labels in after)  # no per-user series by default


def test_metrics_of_several_processes_are_summed(world: World, tmp_path) -> None:
    from contextlib import ExitStack

    from tests.gateway.conftest import database_url_for_subprocess, gateway_args
    from tests.procs import free_port, running

    with world.db():
        env = {
            "DATABASE_URL": database_url_for_subprocess(),
            "SGLANG_URL": world.fast_upstream,
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
            # Prometheus scraping from a listed address needs no token.
            "GATEWAY_MONITORING_ALLOWED_IPS": "127.0.0.0/8",
        }
    urls = []
    with ExitStack() as stack:
        for _ in range(2):
            port = free_port()
            stack.enter_context(running(gateway_args(port), f"http://127.0.0.1:{port}/health", env))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            openai.OpenAI(
                base_url=f"{url}/v1", api_key=world.keys["dev"], max_retries=0
            ).chat.completions.create(model="korean-qwen", messages=KOREAN_CHAT, max_tokens=2)
        key = ("gateway_requests_total", (("model", FAST_MODEL), ("status", "200")))
        # Counted at settlement, just after each response went out: give the last one a moment.
        deadline = time.monotonic() + 5
        while gateway_metrics(urls[0], {}).get(key) != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        merged = gateway_metrics(urls[0], {})
    assert merged[key] == 2


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "도시의 현재 날씨를 알려 준다",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize(
    "extra",
    [
        {"messages": [{"role": "user", "content": "안녕하세요. 오늘 서울 날씨가 어떤가요?"}]},
        {"messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]},
        {"messages": [{"role": "user", "content": "GPT-4o와 Qwen2.5-7B 모델 (2024년 기준)"}]},
        {"messages": [{"role": "user", "content": "좋아요 👍😀 감사합니다 🙏"}]},
        {"messages": [{"role": "user", "content": "def add(a, b):\n    return a + b  # 합\n"}]},
        {"messages": KOREAN_CHAT},
        {"messages": [{"role": "user", "content": "부산 날씨는?"}], "tools": [WEATHER_TOOL]},
        {
            "messages": [{"role": "user", "content": "부산 날씨는?"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "none",
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "첫째"}, {"type": "text", "text": "둘째"}],
                }
            ]
        },
        {
            "messages": [{"role": "user", "content": "생각하지 말고 답해"}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
    ],
    ids=[
        "korean",
        "english",
        "mixed",
        "emoji",
        "code",
        "system",
        "tools",
        "tools-none",
        "parts",
        "kwargs",
    ],
)
def test_the_gateways_count_equals_the_upstreams_prompt_tokens(world: World, extra: dict) -> None:
    response = post(world, "/chat/completions", {"model": "korean-qwen", "max_tokens": 1, **extra})
    assert response.status_code == 200, response.text
    row = world.ledger_row(response.headers["x-request-id"])
    assert (
        row.estimated_prompt_tokens
        == response.json()["usage"]["prompt_tokens"]
        == row.prompt_tokens
    )


def test_api_me_gives_the_numbers_of_the_ratelimit_headers(world: World) -> None:
    """The REST API's /me reads the same limiter as the gateway, in the running server: while a
    stream runs, its windows are exactly what the stream's x-ratelimit-* headers said, and once
    it is settled, what the upstream billed."""
    from tests.gateway.conftest import make_user

    with world.db():
        user, key = make_user(f"me-{os.getpid()}-{time.monotonic_ns()}")
    api = httpx.Client(
        base_url=f"{world.url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    body = {"model": "slow-qwen", "messages": KOREAN_CHAT, "max_tokens": 40, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{world.v1}/chat/completions", json=body, headers=headers,
                      timeout=30) as stream:  # fmt: skip
        assert stream.status_code == 200
        during = {w["window"]: w for w in api.get("/me").json()["scopes"][0]["windows"]}
        in_flight = api.get("/me").json()["scopes"][0]["in_flight"]
        for name, header in (
            ("requests_per_minute", "requests"),
            ("tokens_per_minute", "tokens"),
            ("tokens_per_hour", "tokens-hour"),
            ("tokens_per_day", "tokens-day"),
        ):
            assert during[name]["remaining"] == int(
                stream.headers[f"x-ratelimit-remaining-{header}"]
            ), name
            assert during[name]["limit"] == int(stream.headers[f"x-ratelimit-limit-{header}"])
        assert in_flight == 1
        stream.read()
    billed = sdk(world, key).chat.completions.create(
        model="korean-qwen", messages=KOREAN_CHAT, max_tokens=5
    )
    deadline = time.monotonic() + 10
    while True:  # the stream's settlement happens as it ends; poll, never sleep-and-assert
        scope = api.get("/me").json()["scopes"][0]
        if scope["in_flight"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    windows = {w["window"]: w for w in scope["windows"]}
    assert scope["in_flight"] == 0
    assert windows["requests_per_minute"]["used"] == 2
    streamed = world.billed_tokens(user.pk, streamed=True)
    assert billed.usage is not None
    assert windows["tokens_per_day"]["used"] == streamed + billed.usage.total_tokens
