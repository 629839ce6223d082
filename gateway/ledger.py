"""Usage events leave the request path as one line appended to a local spool file.

The request path pays for serialising the event and one buffered `write` (microseconds, see
docs/benchmarks.md); the line is then in the OS's hands, so a crash of this process loses
nothing. Every GATEWAY_LEDGER_FLUSH_SECONDS the writer thread seals the current spool segment
and ships it: with REDIS_URL to the ledger stream (one pipelined XADD per batch; Celery's
`drain_ledger` writes the database, see quotas/ledger_stream.py), without it (the
single-process quick start) straight into the database, replay-safe by request id. A segment is
deleted only after it was shipped; segments left by a process that died are shipped by the next
writer on this host. If the destination is down, segments wait on disk and are retried.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
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


class Spool:
    """Append-only segments `<host>~<pid>~<id>~<n>.open`, renamed `.ready` once sealed.

    Several processes (and, in tests, several writers in one process) share the directory:
    each ships only its own segments, and adopts a dead process's segments by an atomic
    rename, so no segment is ever shipped by two writers at once.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = f"{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._sequence = 0
        self.adopted: set[str] = set()  # names of segments taken over from dead processes
        self.lines = 0  # in the open segment
        self._file = self._open()

    def _next_path(self, state: str) -> Path:
        self._sequence += 1
        return self.directory / f"{self.name}~{self._sequence}.{state}"

    def _open(self) -> Any:
        self._open_path = self._next_path("open")
        return self._open_path.open("a", encoding="utf-8", buffering=1)  # a write a line

    def append(self, line: str) -> None:
        with self._lock:
            self._file.write(line + "\n")
            self.lines += 1

    def seal(self) -> None:
        with self._lock:
            if not self.lines:
                return
            self._file.close()
            self._open_path.rename(self._open_path.with_suffix(".ready"))
            self.lines = 0
            self._file = self._open()

    def ready(self) -> list[Path]:
        """This writer's sealed segments, after adopting those of processes that died."""
        for path in [*self.directory.glob("*.open"), *self.directory.glob("*.ready")]:
            if path.name.startswith(self.name + "~") or _alive(path.name):
                continue
            with self._lock:
                target = self._next_path("ready")
            with contextlib.suppress(FileNotFoundError):  # another writer adopted it first
                path.rename(target)
                self.adopted.add(target.name)
        mine = self.directory.glob(f"{self.name}~*.ready")
        return sorted(mine, key=lambda p: int(p.stem.rsplit("~", 1)[1]))


def _alive(file_name: str) -> bool:
    host, pid, *_ = file_name.split("~")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LedgerWriter:
    def __init__(self, flush_seconds: float, max_pending: int, spool_dir: Path) -> None:
        self._flush_seconds = flush_seconds
        self._max_pending = max_pending
        self._spool_dir = spool_dir
        self._spool: Spool | None = None
        self._shipping = threading.Lock()  # one shipper at a time (thread and explicit flushes)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.unshipped = 0  # events of this process not yet shipped
        self.dropped = 0
        self.written = 0

    def record(self, event: UsageEvent) -> None:
        if self.unshipped >= self._max_pending:
            # A destination down for long must not fill the disk; say so loudly.
            self.dropped += 1
            log.error("ledger spool full (%d); dropping %s", self._max_pending, event.request_id)
            return
        if self._spool is None:
            self._spool = Spool(self._spool_dir)
            self._start()
        self._spool.append(json.dumps(event_row(event), ensure_ascii=False))
        self.unshipped += 1

    @property
    def pending(self) -> int:
        return self.unshipped

    def flush(self) -> int:
        """Ship everything spooled so far (and what dead processes left); returns events shipped."""
        if self._spool is None:
            self._spool = Spool(self._spool_dir)
        shipped = 0
        with self._shipping:
            self._spool.seal()
            for segment in self._spool.ready():
                rows = [tuple(json.loads(line)) for line in _lines(segment)]
                for first in range(0, len(rows), BATCH_SIZE):
                    _ship(rows[first : first + BATCH_SIZE])
                segment.unlink()
                shipped += len(rows)
                if segment.name in self._spool.adopted:
                    self._spool.adopted.discard(segment.name)
                else:
                    self.unshipped = max(self.unshipped - len(rows), 0)
        self.written += shipped
        return shipped

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
                log.exception("ledger shipping failed; %d events wait on disk", self.pending)
            finally:
                close_old_connections()

    def _flush_at_exit(self) -> None:
        try:
            self.flush()
        except Exception:
            log.exception("ledger: %d events stay in the spool for the next start", self.pending)


def _lines(segment: Path) -> list[str]:
    # A process killed mid-write can leave a torn last line: skip it rather than block the rest.
    text = segment.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1]:
        log.warning("%s: dropping a torn last line", segment)
    return [line for line in lines[:-1] if line]


def event_row(e: UsageEvent) -> tuple[Any, ...]:
    """The event as a ledger row (quotas.services.LEDGER_COLUMNS order, times as epoch)."""
    return (
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


def _ship(rows: list[tuple[Any, ...]]) -> None:
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
