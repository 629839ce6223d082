"""Which of a model's servers takes a request (ServedModel.more_upstream_urls: replicas).

A model with one server pays nothing here: that server is the answer, with no bookkeeping.

With several, each gateway keeps, per server:
- **its load**: the server's own count of running and queued requests (SGLang's `/get_load`,
  read every GATEWAY_ROUTING_POLL_SECONDS by `Router.poll`, so it counts every gateway's
  requests), plus the requests this gateway sent there since that reading (which the reading
  cannot have seen yet). Servers that do not have `/get_load` (vLLM, llama.cpp, OpenAI-like
  ones) are weighed by this gateway's own requests in flight there;
- **its health**: a server that refuses a connection, or whose load reading fails
  EJECT_AFTER times in a row, is ejected: no request goes there until a reading answers again
  (active check), or at the latest until its ejection runs out (EJECT_SECONDS, doubling while
  it keeps failing, up to EJECT_MAX_SECONDS), when one request may try it again (passive).
  If every server is ejected, all are tried rather than none (a router that refuses everyone
  because of a bad reading is worse than one request that fails).

Choice (`Router.choose`): the servers are ranked for the request's affinity key by rendezvous
hashing (the same key always prefers the same server, and only the keys of a server that
leaves move). The key is the request's system prompt when it has one, else its user: the
requests that share a prompt prefix go where that prefix is cached (SGLang's radix cache), so
long system prompts are not prefilled again on every server. The preferred server is taken
unless it is busier than the least loaded one by more than AFFINITY_SLACK requests and by more
than AFFINITY_RATIO times; then the least loaded is. SGLang's own model gateway balances its
cache-aware policy the same way (`--balance-abs-threshold 64 --balance-rel-threshold 1.5`,
lightseekorg/smg docs/getting-started/load-balancing.md); the absolute slack here is smaller
because a server of a Korean service on one GPU runs tens of requests, not hundreds.

A connection refused is retried on another server by the proxy (gateway/proxy.py): nothing
was sent, so nothing can run twice. Nothing is retried once the server had the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from django.conf import settings

from gateway import metrics
from gateway.caches import ModelInfo
from gateway.upstream_kinds import load_ranks

log = logging.getLogger(__name__)

EJECT_AFTER = 2  # failed load readings in a row (a refused connection ejects at once)
EJECT_SECONDS = 5.0
EJECT_MAX_SECONDS = 60.0
AFFINITY_SLACK = 4  # requests
AFFINITY_RATIO = 1.5
LOAD_PATH = "/get_load"
LOAD_TIMEOUT_SECONDS = 2.0


@dataclass
class Server:
    url: str
    in_flight: int = 0  # this gateway's requests there now
    reported: int | None = None  # running + queued, as the server last said (None: unknown)
    sent_since_report: int = 0
    failures: int = 0  # in a row
    ejections: int = 0  # in a row: the next ejection lasts longer
    ejected_until: float = 0.0  # monotonic; 0: not ejected

    def load(self) -> int:
        if self.reported is None:
            return self.in_flight
        return self.reported + self.sent_since_report


def rendezvous(key: str, urls: Iterable[str]) -> list[str]:
    """`urls` in the order `key` prefers them (highest random weight first)."""

    def weight(url: str) -> bytes:
        return hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest()

    return sorted(urls, key=weight, reverse=True)


class Router:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.servers: dict[str, Server] = {}

    def _server(self, url: str) -> Server:
        server = self.servers.get(url)
        if server is None:
            server = self.servers[url] = Server(url)
        return server

    def healthy(self, url: str) -> bool:
        server = self.servers.get(url)
        return server is None or server.ejected_until <= self.clock()

    def choose(self, model: ModelInfo, affinity: str, tried: frozenset[str] = frozenset()) -> str:
        """The server for a request; "" when every server was tried already."""
        urls = model.servers()
        if len(urls) == 1:
            return "" if urls[0] in tried else urls[0]
        left = [url for url in urls if url not in tried]
        if not left:
            return ""
        candidates = [url for url in left if self.healthy(url)] or left
        ranked = rendezvous(affinity, candidates)
        loads = {url: self._server(url).load() for url in ranked}
        least = min(ranked, key=lambda url: loads[url])  # the first of equals: the preferred
        preferred = ranked[0]
        busier = loads[preferred] - loads[least]
        if busier > AFFINITY_SLACK and loads[preferred] > AFFINITY_RATIO * loads[least]:
            return least
        return preferred

    def started(self, url: str) -> None:
        server = self._server(url)
        server.in_flight += 1
        server.sent_since_report += 1

    def finished(self, url: str) -> None:
        server = self._server(url)
        server.in_flight = max(server.in_flight - 1, 0)

    def answered(self, url: str) -> None:
        """The server took a request: an ejection that ran out is over (passive recovery)."""
        server = self._server(url)
        if server.ejections and server.ejected_until <= self.clock():
            log.warning("upstream %s answers again", url)
            server.failures = server.ejections = 0
            server.ejected_until = 0.0

    def refused(self, url: str) -> None:
        """The server refused a connection: out at once."""
        self._eject(self._server(url))

    def _eject(self, server: Server) -> None:
        seconds = min(EJECT_SECONDS * 2**server.ejections, EJECT_MAX_SECONDS)
        server.ejections += 1
        server.ejected_until = self.clock() + seconds
        metrics.UPSTREAM_EJECTIONS.labels(server.url).inc()
        log.warning("upstream %s ejected for %.0f s", server.url, seconds)

    def reading(self, url: str, load: int | None) -> None:
        """A load reading: `None` when it failed."""
        server = self._server(url)
        if load is None:
            server.failures += 1
            if server.failures >= EJECT_AFTER and server.ejected_until <= self.clock():
                self._eject(server)
            return
        if server.ejected_until:
            log.warning("upstream %s answers again", url)
        server.failures = server.ejections = 0
        server.ejected_until = 0.0
        server.reported, server.sent_since_report = load, 0

    async def poll(self, session: aiohttp.ClientSession, models: Iterable[ModelInfo]) -> None:
        """One load reading of every server of the models that have several."""
        urls = {url for model in models if len(model.servers()) > 1 for url in model.servers()}
        await asyncio.gather(*(self._read(session, url) for url in sorted(urls)))

    async def _read(self, session: aiohttp.ClientSession, url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=LOAD_TIMEOUT_SECONDS)
        try:
            async with session.get(f"{url}{LOAD_PATH}", timeout=timeout) as response:
                if response.status == 404:  # not SGLang: alive, weighed by own requests
                    self.reading(url, self._server(url).in_flight)
                    return
                if response.status != 200:
                    self.reading(url, None)
                    return
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.reading(url, None)
            return
        self.reading(url, reported_load(body))

    async def run(
        self,
        session: Callable[[], aiohttp.ClientSession],
        models: Callable[[], Iterable[ModelInfo]],
    ) -> None:
        """Read the loads until cancelled (the gateway's lifespan)."""
        while True:
            with contextlib.suppress(Exception):
                await self.poll(session(), models())
            await asyncio.sleep(settings.GATEWAY_ROUTING_POLL_SECONDS)


def reported_load(body: object) -> int | None:
    """Requests running and queued on every rank (upstream_kinds.load_ranks: SGLang's
    `num_reqs`); None when the answer has no valid count."""
    counts: list[int] = []
    for rank in load_ranks(body):
        value = rank.get("num_reqs")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None
        counts.append(value)
    return min(sum(counts), 1_000_000) if counts else None


SYSTEM_PROMPT_CHARS = 4096  # prompts alike this far share a server (bounded work a request)


def routing_key(model: ModelInfo, user_id: int, fields: dict[str, Any]) -> str:
    """The affinity key of a request ("" for a model with one server: nothing to choose): its
    system prompt's digest when it starts with one, else its user."""
    if len(model.servers()) == 1:
        return ""
    messages = fields.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        first = messages[0]
        content = first.get("content")
        if first.get("role") in ("system", "developer") and isinstance(content, str) and content:
            digest = hashlib.blake2b(
                content[:SYSTEM_PROMPT_CHARS].encode("utf-8", "surrogatepass"), digest_size=12
            )
            return f"s:{digest.hexdigest()}"
    return f"u:{user_id}"
