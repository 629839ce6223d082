"""A hostile client against the running gateway: every answer is JSON, nothing reaches the model
server unchecked, and no request can hold up another.

All processes are real (tests/gateway/conftest.py); the GPU is the simulator.
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from quotas.request_policy import GATEWAY_OWNED_FIELDS
from tests.gateway.conftest import FAST_MODEL, World, hooks_plan, make_user
from tokenlimit.tokens import get_counter, qwen_tokenizer_dir

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "안녕하세요"}]
BOMB_MODEL = "bomb-template-model"
# An operator's template that never finishes: only the gateway's budget stops it.
BOMB_TEMPLATE = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{{ messages[0].content }}"
)


def post(world: World, body: Any, key: str = "dev", path: str = "/v1/chat/completions"):
    headers = {"Authorization": f"Bearer {world.keys[key]}"}
    if isinstance(body, bytes):
        return httpx.post(f"{world.url}{path}", content=body, headers=headers, timeout=30)
    return httpx.post(f"{world.url}{path}", json=body, headers=headers, timeout=30)


def last_upstream_request(world: World) -> dict[str, Any]:
    return httpx.get(f"{world.fast_upstream}/sim/last_request", timeout=5).json()


def assert_json_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert len(response.headers["x-request-id"]) == 32
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


# --- Only what the model server should see gets through ----------------------------------------


@pytest.mark.parametrize("field", sorted(GATEWAY_OWNED_FIELDS))
def test_sglang_native_fields_are_refused_by_name(world: World, field: str) -> None:
    response = post(world, {"model": "korean-qwen", "messages": USER, field: "x"})
    error = assert_json_error(response, 400)
    assert error["param"] == field and error["code"] == "parameter_not_allowed"


def test_the_upstream_sees_checked_fields_plus_what_the_gateway_decides(world: World) -> None:
    body = {
        "model": "korean-qwen",
        "messages": USER,
        "max_tokens": 3,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": ["끝"],
        "regex": "[가-힣]+",
        "chat_template_kwargs": {"enable_thinking": False},
        "user": "end-user-1",
    }
    response = post(world, body)
    assert response.status_code == 200, response.text
    seen = last_upstream_request(world)
    assert seen == {
        **{k: v for k, v in body.items() if k != "user"},
        "model": FAST_MODEL,
        "rid": response.headers["x-request-id"],
    }


def test_a_plan_sets_priority_and_isolates_the_prefix_cache_per_user(world: World) -> None:
    from accounts.services import create_api_key
    from quotas.models import Plan

    with world.db():
        plan = Plan.objects.create(
            name="isolated", priority=5, isolate_prefix_cache=True, extra_request_fields=["sim"]
        )
        first, key_a = make_user("격리1", plan)
        _, key_b = make_user("격리2", plan)
        _, key_a2 = create_api_key(first, actor=None, name="second")
    salts = []
    try:
        for key in (key_a, key_a2, key_b):
            response = httpx.post(
                f"{world.v1}/chat/completions",
                json={"model": "korean-qwen", "messages": USER, "max_tokens": 1},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            assert response.status_code == 200
            seen = last_upstream_request(world)
            assert seen["priority"] == 5
            salts.append(seen["cache_salt"])
        ordinary = post(world, {"model": "korean-qwen", "messages": USER, "max_tokens": 1})
        assert ordinary.status_code == 200
        assert "cache_salt" not in last_upstream_request(world)
    finally:
        with world.db():
            from django.contrib.auth.models import User

            User.objects.filter(username__in=["격리1", "격리2"]).delete()
            plan.delete()
    assert salts[0] == salts[1] != salts[2]  # one salt per user, whichever key
    assert len(salts[0]) == 32


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "korean-qwen:legal-ko"}, 200),
        ({"model": "korean-qwen", "lora_path": "legal-ko"}, 200),
        ({"model": "korean-qwen:stolen-adapter"}, 404),
        ({"model": "korean-qwen", "lora_path": "/etc/passwd"}, 404),
        ({"model": "korean-qwen:legal-ko", "lora_path": "other"}, 400),
    ],
)
def test_adapters_must_be_listed_on_the_model(world: World, body: dict, status: int) -> None:
    response = post(world, {**body, "messages": USER, "max_tokens": 1})
    assert response.status_code == status, response.text
    if status == 200:
        seen = last_upstream_request(world)
        assert seen["model"] == FAST_MODEL and seen["lora_path"] == "legal-ko"


def test_adapters_need_the_plan(world: World) -> None:
    body = {"model": "korean-qwen:legal-ko", "messages": USER, "max_tokens": 1}
    assert post(world, body, key="restricted").status_code == 404
    ids = {card["id"] for card in post_models(world, "restricted")}
    assert "korean-qwen" in ids and f"{FAST_MODEL}:legal-ko" not in ids
    assert f"{FAST_MODEL}:legal-ko" in {card["id"] for card in post_models(world, "dev")}


def post_models(world: World, key: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {world.keys[key]}"}
    return list(httpx.get(f"{world.v1}/models", headers=headers, timeout=10).json()["data"])


# --- Admission reserves what can really be generated ---------------------------------------------


@pytest.fixture
def metered_key(world: World) -> Iterator[str]:
    with world.db():
        _, key = make_user("계량", hooks_plan(), tokens_per_minute=100_000, cooldown_minutes=0)
    yield key
    with world.db():
        from django.contrib.auth.models import User

        User.objects.filter(username="계량").delete()


def remaining_after(world: World, key: str, **fields: Any) -> int:
    """Tokens left in the minute window right after admission (the response's header)."""
    response = httpx.post(
        f"{world.v1}/chat/completions",
        json={"model": "korean-qwen", "messages": USER, "sim": {"completion_tokens": 1}, **fields},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return int(response.headers["x-ratelimit-remaining-tokens"])


def test_n_choices_reserve_n_completions(world: World, metered_key: str) -> None:
    prompt = get_counter(FAST_MODEL).count_chat(USER)
    before = 100_000
    after = remaining_after(world, metered_key, n=4, max_tokens=100)
    assert before - after == prompt + 4 * 100


def test_max_completion_tokens_wins_over_max_tokens(world: World, metered_key: str) -> None:
    prompt = get_counter(FAST_MODEL).count_chat(USER)
    after = remaining_after(world, metered_key, max_completion_tokens=300, max_tokens=1)
    assert 100_000 - after == prompt + 300  # what SGLang may generate, not 1
    assert last_upstream_request(world)["max_completion_tokens"] == 300


def test_without_a_maximum_the_reserved_amount_is_sent_upstream(world: World) -> None:
    assert post(world, {"model": "korean-qwen", "messages": USER}).status_code == 200
    assert last_upstream_request(world)["max_tokens"] == 4096  # LIMITER_DEFAULT_MAX_TOKENS


# --- Every answer is JSON -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["//v1/chat/completions", "/V1/chat/completions", "/v1", "/v1/", "/v1/nothing", "/V1",
     "/v1/chat/completions/extra", "/metrics/x", "/health/x"],
)  # fmt: skip
def test_odd_paths_get_a_json_404(world: World, path: str) -> None:
    response = httpx.post(f"{world.url}{path}", json={}, timeout=10)
    error = assert_json_error(response, 404)
    assert error["code"] == "unknown_url"


def test_wrong_method_is_a_json_405(world: World) -> None:
    response = httpx.delete(f"{world.v1}/chat/completions", timeout=10)
    assert_json_error(response, 405)
    assert response.headers["allow"] == "POST"


LONE = b"\\ud800"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "korean-qwen", "messages": [{"role": "user", "content": "' + LONE + b'"}]}',
        b'{"model": "korean-qwen", "messages": [{"role": "user", "content": "x"}], "stop": "'
        + LONE + b'"}',
        b'{"model": "korean-qwen", "messages": [], "' + LONE + b'": 1}',
        b'{"model": "' + LONE + b'", "messages": []}',
        b'{"model": "korean-qwen", "messages": [{"role": "user", "content": "x"}], "tools": '
        b'[{"type": "function", "function": {"name": "' + LONE + b'"}}]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "korean-qwen", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    ],
    ids=["content", "stop", "key", "model", "tool-name", "100k-brackets", "raw-surrogate-utf8"],
)  # fmt: skip
def test_hostile_bodies_are_400_json(world: World, raw: bytes) -> None:
    error = assert_json_error(post(world, raw), 400)
    assert error["code"] == "invalid_json"


def test_lone_surrogate_in_tokenize_and_odd_tool_shapes_are_400(world: World) -> None:
    calls = [{"role": "assistant", "tool_calls": [{"function": 5}]}]
    bodies = [
        {"model": "korean-qwen", "messages": USER, "tool_choice": {"function": "x"}},
        {"model": "korean-qwen", "messages": calls},
    ]
    for body in bodies:
        assert_json_error(post(world, body, path="/v1/tokenize"), 400)
    raw = b'{"model": "korean-qwen", "prompt": "' + LONE + b'"}'
    assert_json_error(post(world, raw, path="/v1/tokenize"), 400)


def test_two_authorization_headers_are_refused(world: World) -> None:
    key = world.keys["dev"]
    response = httpx.post(
        f"{world.v1}/chat/completions",
        json={"model": "korean-qwen", "messages": USER},
        headers=[("Authorization", f"Bearer {key}"), ("Authorization", "Bearer sk-other")],
        timeout=10,
    )
    assert assert_json_error(response, 400)["code"] == "duplicate_authorization"


# --- No client can stall another ---------------------------------------------------------------


def test_a_client_template_is_refused_before_any_work(world: World) -> None:
    bomb = {"chat_template": "{% for i in range(4000) %}{% for j in range(4000) %}x{% endfor %}"
            "{% endfor %}"}  # fmt: skip
    for path in ("/v1/chat/completions", "/v1/tokenize"):
        started = time.monotonic()
        response = post(
            world,
            {"model": "korean-qwen", "messages": USER, "chat_template_kwargs": bomb},
            path=path,
        )
        error = assert_json_error(response, 400)
        assert error["param"] == "chat_template_kwargs.chat_template"
        assert time.monotonic() - started < 1.0


@pytest.fixture(scope="module")
def bomb_model(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A served model whose (operator's) chat template never finishes."""
    from gateway.models import ServedModel

    source = qwen_tokenizer_dir()
    assert source is not None
    directory = tmp_path_factory.mktemp("bomb-tokenizer")
    for item in source.iterdir():
        shutil.copy(item, directory / item.name)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = BOMB_TEMPLATE
    config_path.write_text(json.dumps(config))
    with world.db():
        ServedModel.objects.create(
            name=BOMB_MODEL, upstream_url=world.fast_upstream, tokenizer=str(directory)
        )
    deadline = time.monotonic() + 30  # the catalog reloads every 5 s; the tokenizer loads then
    while time.monotonic() < deadline:
        if (
            post(world, {"model": BOMB_MODEL, "prompt": "x"}, path="/v1/tokenize").status_code
            == 200
        ):
            break
        time.sleep(0.5)
    yield BOMB_MODEL
    with world.db():
        ServedModel.objects.filter(name=BOMB_MODEL).delete()


@pytest.fixture
def unlimited_key(world: World) -> Iterator[str]:
    unlimited = dict.fromkeys(
        ("requests_per_minute", "tokens_per_minute", "tokens_per_hour", "tokens_per_day",
         "max_parallel_requests"), 0,
    )  # fmt: skip
    with world.db():
        _, key = make_user("무제한", hooks_plan(), **unlimited)
    yield key
    with world.db():
        from django.contrib.auth.models import User

        User.objects.filter(username="무제한").delete()


def chat_latency(client: httpx.Client, key: str) -> float:
    started = time.perf_counter()
    response = client.post(
        "/v1/chat/completions",
        json={"model": "korean-qwen", "messages": USER, "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def test_an_operators_runaway_template_is_cut_off_and_delays_no_one(
    world: World, bomb_model: str, unlimited_key: str
) -> None:
    with httpx.Client(base_url=world.url, timeout=30) as client:
        for _ in range(5):
            chat_latency(client, unlimited_key)  # warm
        quiet = [chat_latency(client, unlimited_key) for _ in range(20)]
        bombs: list[httpx.Response] = []
        stop = threading.Event()

        def bomber() -> None:
            while not stop.is_set():
                bombs.append(post(world, {"model": bomb_model, "messages": USER}))

        threads = [threading.Thread(target=bomber) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # both bombs are rendering
        try:
            loud = [chat_latency(client, unlimited_key) for _ in range(20)]
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert bombs and all(r.status_code == 400 for r in bombs)
    assert bombs[0].json()["error"]["code"] == "template_budget_exceeded"
    # 18 of 20 requests within 50 ms of the quiet median (measured: about 10 ms; with the
    # bombs on the fast pool, 1 s): one hiccup of a busy test machine does not decide it.
    typical = statistics.median(quiet)
    assert sorted(loud)[17] - typical < 0.05, (quiet, loud)


def test_a_body_that_never_arrives_is_answered_408(world: World) -> None:
    host, port = world.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {world.keys['dev']}\r\n".encode()
            + b'Content-Length: 1000\r\n\r\n{"model": '
        )
        started = time.monotonic()
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 5  # GATEWAY_BODY_TIMEOUT_SECONDS=2 in this world


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def upload(world: World, head: bytes, chunk: bytes, total: int) -> tuple[int, bytes]:
    """Send `head`, then `chunk`s until `total` bytes, the server stops reading or answers;
    returns (bytes of body sent, what came back)."""
    host, port = world.url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        sock.settimeout(3)  # the server no longer reading shows as a send that cannot go on
        try:
            while sent < total:
                sock.sendall(chunk)
                sent += len(chunk)
        except (TimeoutError, OSError):
            pass
        sock.settimeout(10)
        try:
            answer = sock.recv(65536)
        except OSError:
            answer = b""  # closed with our unread bytes in flight: a reset, also a refusal
    return sent, answer


REQUEST_HEAD = (
    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    "Authorization: Bearer {key}\r\n"
)


def test_a_400_mb_upload_is_refused_with_flat_memory(world: World) -> None:
    # Warm: the tokenizer (about 80 MB) must not load during the measurement.
    assert (
        post(world, {"model": "korean-qwen", "messages": USER, "max_tokens": 1}).status_code == 200
    )
    peak_before = memory_kib(world.gateway_pid, "VmHWM")
    head = REQUEST_HEAD.format(key=world.keys["dev"]) + "Transfer-Encoding: chunked\r\n\r\n"
    megabyte = b"100000\r\n" + b"a" * 0x100000 + b"\r\n"  # one chunk of 1 MiB
    sent, answer = upload(world, head.encode(), megabyte, 400 * 2**20)
    peak_after = memory_kib(world.gateway_pid, "VmHWM")
    assert sent < 100 * 2**20, "the gateway kept reading a body past its limit"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert peak_after - peak_before < 32 * 1024, (peak_before, peak_after)  # KiB


def test_a_declared_huge_body_is_refused_before_it_is_read(world: World) -> None:
    for length in (400 * 2**20, 10**10):
        head = REQUEST_HEAD.format(key=world.keys["dev"]) + f"Content-Length: {length}\r\n\r\n"
        started = time.monotonic()
        sent, answer = upload(world, head.encode(), b"a" * 65536, 2**20)
        assert answer.startswith(b"HTTP/1.1 413") or answer == b"", answer[:200]
        assert time.monotonic() - started < 10
        assert sent < 2**20 or answer.startswith(b"HTTP/1.1 413")
