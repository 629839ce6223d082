"""The gateway's own failures still answer in JSON with the request id, never a traceback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from gateway import errors
from gateway.app import Gateway
from gateway.asgi_io import Responder


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    made = Gateway()
    yield made
    asyncio.run(made.close())


def call(gateway: Gateway, method: str, path: str, **kwargs: Any) -> httpx2.Response:
    async def go() -> httpx2.Response:
        transport = httpx2.ASGITransport(app=gateway)
        async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def broken(*args: Any) -> None:
    raise RuntimeError("a bug in the gateway")


def test_an_exception_in_a_handler_is_a_json_500_with_the_request_id(gateway: Gateway) -> None:
    gateway.routes["/v1/models"] = ("GET", broken)  # type: ignore[assignment]
    response = call(gateway, "GET", "/v1/models")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert error["type"] == "server_error" and request_id in error["message"]
    assert "Traceback" not in response.text and "a bug" not in response.text


def test_an_exception_while_building_the_error_still_answers_json(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway.routes["/v1/models"] = ("GET", broken)  # type: ignore[assignment]
    monkeypatch.setattr(errors.GatewayError, "body", broken)
    response = call(gateway, "GET", "/v1/models")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert response.headers["content-type"] == "application/json"


def test_an_exception_after_the_stream_started_ends_it_with_an_error_event(
    gateway: Gateway,
) -> None:
    async def half_then_fail(scope: Any, receive: Any, out: Responder) -> None:
        await out.start(200, [(b"content-type", b"text/event-stream")])
        await out.body(b'data: {"choices": []}\n\n', more=True)
        raise RuntimeError("mid-stream bug")

    gateway.routes["/v1/models"] = ("GET", half_then_fail)
    response = call(gateway, "GET", "/v1/models")
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[0] == 'data: {"choices": []}'
    assert '"type":"server_error"' in events[-1]


def test_error_messages_quoting_client_values_always_encode() -> None:
    body = errors.error_body("model `\ud800` " + "x" * 5000, "invalid_request_error", "\udfff")
    assert b"\\ud800" not in body
    assert len(body) < 2200


@pytest.fixture
def admitted(settings: Any, transactional_db: None) -> Iterator[tuple[Gateway, str]]:
    """An in-process gateway (embedded ledger) with a served model and a key."""
    from gateway.models import ServedModel
    from tests.gateway.conftest import FAST_MODEL, make_user

    settings.REDIS_URL = ""
    ServedModel.objects.create(
        name=FAST_MODEL, aliases=["korean-qwen"], upstream_url="http://127.0.0.1:9"
    )
    _, key = make_user("오류행")
    made = Gateway()
    yield made, key
    asyncio.run(made.close())


def rows_for(request_id: str) -> list[Any]:
    from quotas.models import UsageRecord

    return list(UsageRecord.objects.filter(request_id=request_id))


@pytest.mark.parametrize("where", ["before the limiter", "after admission"])
def test_a_bug_of_ours_is_one_500_row_and_a_500_with_the_request_id(
    admitted: tuple[Gateway, str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from gateway.proxy import Proxy

    gateway, key = admitted
    if where == "before the limiter":
        monkeypatch.setattr(Gateway, "_prepare", broken)
    else:
        monkeypatch.setattr(Proxy, "_relay", broken)
    response = call(
        gateway, "POST", "/v1/chat/completions",
        json={"model": "korean-qwen", "messages": [{"role": "user", "content": "안녕"}]},
        headers={"Authorization": f"Bearer {key}"},
    )  # fmt: skip
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    request_id = response.headers["x-request-id"]
    gateway.ledger.flush()
    [row] = rows_for(request_id)
    assert (row.status_code, row.error_type) == (500, "server_error")
    assert row.completion_tokens == 0


def test_the_last_resort_answer_carries_the_request_id(gateway: Gateway, monkeypatch) -> None:
    gateway.routes["/v1/models"] = ("GET", broken)  # type: ignore[assignment]
    monkeypatch.setattr(errors.GatewayError, "body", broken)
    response = call(gateway, "GET", "/v1/models")
    assert len(response.headers["x-request-id"]) == 32


def test_a_client_gone_before_its_body_arrived_is_one_499_row(
    admitted: tuple[Gateway, str],
) -> None:
    gateway, key = admitted
    messages = iter(
        [
            {"type": "http.request", "body": b'{"model": "korean-qwen", ', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/v1/chat/completions",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }  # fmt: skip
    asyncio.run(gateway(scope, receive, send))
    assert sent == []  # nobody to answer
    gateway.ledger.flush()
    from quotas.models import UsageRecord

    [row] = UsageRecord.objects.filter(error_type="client_closed")
    assert row.status_code == 499 and row.prompt_tokens == 0


def test_an_upstream_failure_is_logged_once_with_request_id_status_and_latency(
    admitted: tuple[Gateway, str], caplog: pytest.LogCaptureFixture
) -> None:
    gateway, key = admitted  # its upstream, port 9, refuses connections
    with caplog.at_level("WARNING", logger="gateway.proxy"):
        response = call(
            gateway, "POST", "/v1/chat/completions",
            json={"model": "korean-qwen", "messages": [{"role": "user", "content": "안녕"}]},
            headers={"Authorization": f"Bearer {key}"},
        )  # fmt: skip
    assert response.status_code == 502
    request_id = response.headers["x-request-id"]
    [line] = [r.getMessage() for r in caplog.records if r.name == "gateway.proxy"]
    assert "upstream failure" in line and request_id in line
    assert "status 502" in line and " ms," in line
