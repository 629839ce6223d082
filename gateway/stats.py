"""Each gateway process's once-a-second summary, published to the `stats` channel group.

Counts come from the process's own tallies (no database, no Redis on the request path); the
publishing task runs only while the process serves traffic and costs one group_send a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from channels.layers import get_channel_layer

log = logging.getLogger(__name__)
INTERVAL = 1.0
# The channel group gateways publish to and the live console (telemetry/consumers.py) reads.
STATS_GROUP = "stats"


class StatsPublisher:
    def __init__(self) -> None:
        self.requests = 0
        self.rate_limited = 0
        self.tokens = 0
        self.errors = 0  # answers >= 400 other than 429 (a client disconnect is 499)
        self.in_flight = 0
        self.process = f"{socket.gethostname()}:{os.getpid()}"
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def count(self, status: int, tokens: int = 0) -> None:
        """One finished request, as the roll-ups count it: 429 rate-limited, other >= 400 an
        error."""
        self.requests += 1
        self.tokens += tokens
        if status == 429:
            self.rate_limited += 1
        elif status >= 400:
            self.errors += 1

    def summary(self, seconds: float) -> dict[str, object]:
        requests, limited, tokens = self.requests, self.rate_limited, self.tokens
        errors = self.errors
        self.requests = self.rate_limited = self.tokens = self.errors = 0
        return {
            "process": self.process,
            "at": time.time(),
            "requests_per_second": round(requests / seconds, 2),
            "tokens_per_second": round(tokens / seconds, 2),
            "rate_limited_per_second": round(limited / seconds, 2),
            "errors_per_second": round(errors / seconds, 2),
            "in_flight": self.in_flight,
        }

    async def publish(self, seconds: float = INTERVAL) -> None:
        layer = get_channel_layer()
        if layer is not None:
            await layer.group_send(
                STATS_GROUP, {"type": "stats.gateway", "summary": self.summary(seconds)}
            )

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(INTERVAL)
            try:
                await self.publish(time.monotonic() - started)
            except Exception:
                log.warning("could not publish gateway stats", exc_info=True)
