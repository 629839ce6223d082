"""Minimal ASGI plumbing for the gateway: reading a bounded body, sending JSON and SSE."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from gateway.errors import GatewayError, error_body

log = logging.getLogger(__name__)

AsgiScope = MutableMapping[str, Any]
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
# On every error: never cached by a proxy, never sniffed into something else by a browser.
ERROR_HEADERS: Headers = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
# If even building an error fails, this is what leaves.
LAST_RESORT = error_body("The gateway failed to handle this request.", "server_error")


class ClientDisconnected(Exception):
    pass


def header(scope: AsgiScope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def header_count(scope: AsgiScope, name: bytes) -> int:
    return sum(1 for key, _ in scope["headers"] if key == name)


def payload_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than the gateway's limit of {limit} bytes.",
        code="request_too_large",
        headers=[(b"connection", b"close")],
    )


def body_timed_out(seconds: float) -> GatewayError:
    return GatewayError(
        408,
        f"The request body did not arrive within {seconds:g} seconds.",
        code="request_timeout",
        headers=[(b"connection", b"close")],
    )


async def read_body(scope: AsgiScope, receive: Receive, limit: int, time_limit: float) -> bytes:
    """The whole body, refused at `limit` bytes before more is read, and within `time_limit`.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body
    is refused as soon as it passes the limit; a body that stops arriving (a Content-Length
    that lies) is answered 408 after `time_limit` seconds. The ASGI server stops reading when
    we stop receiving, so memory stays flat whatever the client sends (uvicorn's flow control).
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    deadline = asyncio.get_running_loop().time() + time_limit
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise body_timed_out(time_limit) from None
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
    """Wraps `send`: every response carries the request id, and error handling knows whether a
    response has started (and so whether an error can still be a status code)."""

    __slots__ = ("_send", "finished", "request_id", "started", "status")

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self.request_id = request_id
        self.started = False
        self.finished = False
        self.status = 0

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        self.status = status
        headers = [*headers, (b"x-request-id", self.request_id.encode())]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, more: bool = False) -> None:
        self.finished = not more
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def complete(self, status: int, data: bytes, headers: Headers) -> None:
        length = (b"content-length", str(len(data)).encode())
        await self.start(status, [*JSON_HEADERS, length, *headers])
        await self.body(data)

    async def json(self, status: int, payload: Any, headers: Headers | None = None) -> None:
        await self.complete(status, orjson.dumps(payload), headers or [])

    async def error(self, exc: GatewayError, headers: Headers | None = None) -> None:
        await self.complete(
            exc.status, exc.body(), [*ERROR_HEADERS, *exc.headers, *(headers or [])]
        )

    async def fail(self, exc: GatewayError) -> None:
        """Answer `exc` however far the response got; never raises (the last line of defence)."""
        try:
            if not self.started:
                await self.error(exc)
            elif not self.finished:
                # Headers are gone: end the stream with an error event, as SGLang does.
                await self.body(b"data: " + exc.body() + b"\n\n")
        except Exception:
            log.exception("could not send the error response for %s", self.request_id)
            if not self.started:
                await self._last_resort()

    async def _last_resort(self) -> None:
        try:
            await self._send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        *JSON_HEADERS,
                        *ERROR_HEADERS,
                        (b"x-request-id", self.request_id.encode()),
                    ],
                }
            )
            await self._send({"type": "http.response.body", "body": LAST_RESORT})
        except Exception:
            log.exception("the ASGI server refused even the last-resort error response")


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (its body was read before: only the end is left)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
