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


TOKENIZE_TIMEOUT_SECONDS = 5.0


async def tokenize_upstream(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, add_special_tokens: bool
) -> list[int] | None:
    """The upstream's own token ids for `prompt` (SGLang's /v1/tokenize, vLLM's /tokenize: both
    take {model, prompt, add_special_tokens} and answer {tokens, count, …}), for a model the
    gateway can only estimate. None when it did not answer usable ids."""
    body = {"model": model, "prompt": prompt, "add_special_tokens": add_special_tokens}
    try:
        timeout = aiohttp.ClientTimeout(total=TOKENIZE_TIMEOUT_SECONDS)
        async with session.post(url, json=body, timeout=timeout) as response:
            if response.status != 200:
                return None
            payload = await response.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None
    tokens = payload.get("tokens") if isinstance(payload, dict) else None
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        return None
    return tokens
