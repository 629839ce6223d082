"""The one shared, pooled HTTP client to SGLang.

aiohttp rather than httpx on this path: inside this stack a shared aiohttp session cost
0.1-0.35 ms of CPU per proxied request against 2-3 ms for httpx (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio

import aiohttp
from django.conf import settings

from gateway.errors import GatewayError


class Upstream:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        # A session belongs to the loop that made it; tests and servers may run several loops.
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(
                limit=settings.GATEWAY_UPSTREAM_POOL_SIZE,
                limit_per_host=settings.GATEWAY_UPSTREAM_POOL_SIZE,
                keepalive_timeout=30,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # The client may send any JSON; the gateway never needs cookies or redirects.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


def timeouts(request_timeout: float, streamed: bool) -> aiohttp.ClientTimeout:
    read = min(request_timeout, settings.GATEWAY_UPSTREAM_READ_TIMEOUT)
    return aiohttp.ClientTimeout(
        # A stream may run for long; what must not happen is a long silence between chunks.
        total=None if streamed else request_timeout,
        connect=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
        sock_connect=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
        sock_read=read,
    )


def unreachable(url: str, exc: BaseException) -> GatewayError:
    return GatewayError(
        502,
        f"The model server at {url} is unreachable: {exc.__class__.__name__}.",
        type_="upstream_error",
        code="upstream_unreachable",
    )


def timed_out(url: str) -> GatewayError:
    return GatewayError(
        504,
        f"The model server at {url} did not answer in time.",
        type_="upstream_error",
        code="upstream_timeout",
    )
