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
    made.ledger.flush()


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
