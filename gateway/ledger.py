"""Usage events leave the request path as a list append; a thread ships them in batches.

The request path pays for one `deque.append`. Every GATEWAY_LEDGER_FLUSH_SECONDS the writer
thread ships what is pending: with REDIS_URL to the ledger stream (one pipelined XADD per
batch; Celery's `drain_ledger` writes the database, see quotas/ledger_stream.py), without it
(the single-process quick start) straight into the database, one INSERT per batch, replay-safe
by request id. If the destination is down the events stay queued and are retried; at process
exit whatever is pending is shipped once more.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)
BATCH_SIZE = 1000


@dataclass(slots=True)
class UsageEvent:
    request_id: str
    user_id: int
    key_id: int
    model: str
    endpoint: str
    status_code: int
    streamed: bool
    started_at: float  # epoch seconds
    finished_at: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    estimated_prompt_tokens: int = 0
    usage_source: str = "upstream"
    error_type: str = ""
    client_disconnected: bool = False
    upstream_latency_ms: float | None = None
    ttft_ms: float | None = None


class LedgerWriter:
    def __init__(self, flush_seconds: float, max_pending: int) -> None:
        self._flush_seconds = flush_seconds
        self._max_pending = max_pending
        self._pending: deque[UsageEvent] = deque()
        self._lock = threading.Lock()  # one writer at a time (thread and explicit flushes)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.written = 0

    def record(self, event: UsageEvent) -> None:
        if len(self._pending) >= self._max_pending:
            # Bounded memory beats an out-of-memory crash that would lose everything pending.
            self.dropped += 1
            log.error("ledger backlog full (%d); dropping %s", self._max_pending, event.request_id)
            return
        self._pending.append(event)
        if self._thread is None:
            self._start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> int:
        """Write everything pending now; returns the number of events written."""
        written = 0
        with self._lock:
            while self._pending:
                batch = [
                    self._pending.popleft() for _ in range(min(BATCH_SIZE, len(self._pending)))
                ]
                try:
                    _write_batch(batch)
                except Exception:
                    self._pending.extendleft(reversed(batch))
                    raise
                written += len(batch)
        self.written += written
        return written

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        atexit.register(self._flush_at_exit)

    def _run(self) -> None:
        backoff = self._flush_seconds
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            try:
                self.flush()
                backoff = self._flush_seconds
            except Exception:
                backoff = min(backoff * 2, 30.0)
                log.exception("ledger write failed; %d events kept, retrying", self.pending)
            finally:
                close_old_connections()

    def _flush_at_exit(self) -> None:
        try:
            self.flush()
        except Exception:
            log.exception("ledger: %d events could not be written at exit", self.pending)


def _write_batch(batch: list[UsageEvent]) -> None:
    rows = [
        (
            e.request_id,
            e.user_id,
            e.key_id,
            e.model,
            e.endpoint,
            e.prompt_tokens,
            e.completion_tokens,
            e.cached_tokens,
            e.estimated_prompt_tokens,
            e.usage_source,
            e.status_code,
            e.error_type,
            e.streamed,
            e.client_disconnected,
            e.started_at,
            e.finished_at,
            e.upstream_latency_ms,
            e.ttft_ms,
        )
        for e in batch
    ]
    if settings.REDIS_URL:
        from quotas import ledger_stream

        global _stream_client
        if _stream_client is None:
            _stream_client = ledger_stream.client()
        ledger_stream.append_rows(_stream_client, rows)
    else:
        from quotas.services import record_usage_rows

        record_usage_rows(rows)


_stream_client: Any = None
