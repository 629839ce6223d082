"""Minimal ASGI plumbing for the gateway: reading a bounded body, sending JSON and SSE."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway.errors import GatewayError
from gateway.validation import payload_too_large

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Tells nginx-style proxies in front of us not to buffer the stream.
    (b"x-accel-buffering", b"no"),
]


class ClientDisconnected(Exception):
    pass


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Responder:
    """Wraps `send` so error handling knows whether a response has already started."""

    __slots__ = ("_send", "started", "status")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.status = 0

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        self.status = status
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, more: bool = False) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def complete(self, status: int, data: bytes, headers: Headers) -> None:
        await self.start(status, [*JSON_HEADERS, *headers])
        await self.body(data)

    async def json(self, status: int, payload: Any, headers: Headers | None = None) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        await self.complete(status, body, headers or [])

    async def error(self, exc: GatewayError, headers: Headers | None = None) -> None:
        await self.complete(exc.status, exc.body(), [*exc.headers, *(headers or [])])
