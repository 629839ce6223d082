"""Usage events leave the request path as lines appended to a local spool file.

The request path pays for serialising and one buffered `write` per line (microseconds, see
docs/benchmarks.md); the line is then in the OS's hands, so a crash of this process loses
nothing it wrote. Three kinds of line:
- `{"open": …}` when a request is admitted (write-ahead): who, what was reserved, the limiter
  scopes to release;
- `{"progress": …}` every GATEWAY_LEDGER_CHECKPOINT_SECONDS of a stream: output so far;
- a ledger row (a JSON list, tokenlimit/ledger_rows.py) when the request is finished.
Every GATEWAY_LEDGER_FLUSH_SECONDS the writer thread seals the current segment (the new one
starts with the open requests again, so a request's open line is always in an unshipped
segment) and ships its rows: with REDIS_URL to the ledger stream (Celery's `drain_ledger`
writes the database, quotas/ledger_stream.py), without it straight into the database,
replay-safe by request id. A segment is deleted only after it was shipped.

A dead process's segments are adopted (`adopt_dead`) by the next writer on this host, at its
start and periodically: their finished rows are shipped, and their requests still open are
closed as interrupted, charged the gateway's prompt count plus the output their last
checkpoint saw (never the reservation), and returned so the caller releases their limiter
reservations at once instead of after the lease. Liveness is an exclusive `flock` each writer
holds on `<name>.lock` for its lifetime: the kernel drops it when the process dies, so a
reused PID (every container's gateway is PID 1) is never mistaken for the dead one.

If the host and its disk are lost, what was not yet shipped is lost with them (at most one
flush interval of finished rows, and the requests running then); their reservations are
released when their leases run out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from django.conf import settings
from django.db import close_old_connections

from tokenlimit.ledger_rows import INTERRUPTED, clean_row

log = logging.getLogger(__name__)
BATCH_SIZE = 1000
ADOPTION_LOCK = "adopting.flock"  # one adopter at a time on this host


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


@dataclass(slots=True)
class OpenRequest:
    """An admitted request, as written ahead: enough to bill and release it if this process
    dies before it finishes."""

    request_id: str
    user_id: int
    key_id: int
    model: str
    endpoint: str
    streamed: bool
    started_at: float
    prompt_tokens: int  # the gateway's count: what the upstream processes first
    # Limiter scopes holding the reservation: [key, rpm, tpm, tph, tpd, cooldown, parallel].
    scopes: list[list[Any]] = field(default_factory=list)
    completion_tokens: int = 0  # as of the last checkpoint
    responded: bool = False  # a 200 and its headers went out (a stream had started)


@dataclass(frozen=True, slots=True)
class Interrupted:
    """A dead process's request closed by adoption: the caller releases its reservation."""

    request_id: str
    scopes: list[list[Any]]
    charged: int


def interrupted_event(request: OpenRequest, finished_at: float) -> UsageEvent:
    """The row of a request whose gateway died: charged the prompt (the upstream processed it
    first) and the output the last checkpoint saw; 200 if a stream had started, else 502."""
    return UsageEvent(
        request_id=request.request_id,
        user_id=request.user_id,
        key_id=request.key_id,
        model=request.model,
        endpoint=request.endpoint,
        status_code=200 if request.responded else 502,
        streamed=request.streamed,
        started_at=request.started_at,
        finished_at=finished_at,
        prompt_tokens=request.prompt_tokens,
        completion_tokens=request.completion_tokens,
        estimated_prompt_tokens=request.prompt_tokens,
        usage_source="checkpoint",
        error_type=INTERRUPTED,
    )


class Spool:
    """Append-only segments `<host>~<pid>~<id>~<n>.open`, renamed `.ready` once sealed.

    Several processes (and, in tests, several writers in one process) share the directory:
    each ships only its own segments. Not thread-safe: the writer calls it under its lock.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = f"{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}"
        # Held for this writer's life; the kernel releases it when the process dies.
        self._lock_file = (directory / f"{self.name}.lock").open("w")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._sequence = 0
        self.adopted: set[str] = set()  # names of segments taken over from dead processes
        self.events = 0  # finished rows in the open segment
        self.first_event_at: float | None = None  # when the open segment got its first row
        self.sealed_at: dict[str, float] = {}  # sealed segment → when its first row came
        self._file = self._open()

    def next_path(self, state: str) -> Path:
        self._sequence += 1
        return self.directory / f"{self.name}~{self._sequence}.{state}"

    def _open(self) -> IO[bytes]:
        self._open_path = self.next_path("open")
        return self._open_path.open("ab", buffering=0)  # one write(2) a line, nothing held back

    def append(self, line: bytes, *, event: bool) -> None:
        self._file.write(line + b"\n")
        if event:
            self.events += 1
            if self.first_event_at is None:
                self.first_event_at = time.time()

    def seal(self, carried: list[bytes]) -> None:
        """Close the open segment (if it has rows) and start the next with `carried` lines."""
        if not self.events:
            return
        self._file.close()
        sealed = self._open_path.with_suffix(".ready")
        self._open_path.rename(sealed)
        self.sealed_at[sealed.name] = self.first_event_at or time.time()
        self.events, self.first_event_at = 0, None
        self._file = self._open()
        for line in carried:
            self._file.write(line + b"\n")

    def ready(self) -> list[Path]:
        mine = self.directory.glob(f"{self.name}~*.ready")
        return sorted(mine, key=lambda p: int(p.stem.rsplit("~", 1)[1]))

    def oldest_pending_at(self) -> float | None:
        times = [*self.sealed_at.values()]
        if self.first_event_at is not None:
            times.append(self.first_event_at)
        return min(times, default=None)

    def dead_owners(self) -> dict[str, list[Path]]:
        """Segments of writers that are gone, by writer, oldest first."""
        owners: dict[str, list[Path]] = {
            path.stem: [] for path in self.directory.glob("*.lock") if path.stem != self.name
        }
        for path in [*self.directory.glob("*.open"), *self.directory.glob("*.ready")]:
            owner = path.name.rsplit("~", 1)[0]
            if owner != self.name:
                owners.setdefault(owner, []).append(path)
        dead = {}
        for owner, paths in owners.items():
            if _is_dead(self.directory, owner):
                dead[owner] = sorted(paths, key=lambda p: int(p.stem.rsplit("~", 1)[1]))
        return dead

    def close(self) -> None:
        self._file.close()
        if not self.events:
            with contextlib.suppress(FileNotFoundError):
                self._open_path.unlink()  # only open requests' lines, all finished by now
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{self.name}.lock").unlink()
        self._lock_file.close()


def _is_dead(directory: Path, owner: str) -> bool:
    try:
        handle = (directory / f"{owner}.lock").open("r")
    except FileNotFoundError:
        return _pid_is_dead(owner)  # a spool written before lock files existed
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer holds it: alive
    # Nobody holds it. A writer locks before it creates its first segment, so an owner with
    # segments and a free lock is dead.
    return True


def _pid_is_dead(owner: str) -> bool:
    host, pid, *_ = owner.split("~")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class LedgerWriter:
    def __init__(
        self,
        flush_seconds: float,
        max_pending: int,
        spool_dir: Path,
        checkpoint_seconds: float = 2.0,
    ) -> None:
        self._flush_seconds = flush_seconds
        self._max_pending = max_pending
        self._spool_dir = spool_dir
        self.checkpoint_seconds = checkpoint_seconds
        self._spool: Spool | None = None
        # Appends (event loop) and seals (writer thread) take turns; so do the open requests.
        self._lock = threading.Lock()
        self._shipping = threading.Lock()  # one shipper at a time (thread and explicit flushes)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._open: dict[str, OpenRequest] = {}
        self._closed = False
        self.unshipped = 0  # finished events of this process not yet shipped
        self.dropped = 0
        self.written = 0
        self.dead_lettered = 0

    def start(self) -> None:
        """Create this process's spool and start shipping (idempotent)."""
        with self._lock:
            self._ensure_spool()

    def _ensure_spool(self) -> Spool:
        if self._spool is None:
            self._spool = Spool(self._spool_dir)
            if not self._closed:  # after close(), lines still reach the disk for the next start
                self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
                self._thread.start()
        return self._spool

    def open(self, request: OpenRequest) -> None:
        """Write ahead: the request was admitted."""
        with self._lock:
            self._open[request.request_id] = request
            self._ensure_spool().append(_dumps({"open": request}), event=False)

    def progress(self, request_id: str, completion_tokens: int, responded: bool) -> None:
        with self._lock:
            request = self._open.get(request_id)
            if request is None:
                return
            request.completion_tokens, request.responded = completion_tokens, responded
            line = {"progress": request_id, "tokens": completion_tokens, "responded": responded}
            self._ensure_spool().append(_dumps(line), event=False)

    def record(self, event: UsageEvent) -> None:
        line = _dumps(event_row(event))
        with self._lock:
            self._open.pop(event.request_id, None)
            if self.unshipped >= self._max_pending:
                # A destination down for long must not fill the disk; say so loudly.
                self.dropped += 1
                log.error(
                    "ledger spool full (%d); dropping %s", self._max_pending, event.request_id
                )
                return
            self._ensure_spool().append(line, event=True)
            self.unshipped += 1

    @property
    def pending(self) -> int:
        return self.unshipped

    def oldest_pending_age(self) -> float:
        """Seconds the oldest finished event of this process has waited to be shipped."""
        with self._lock:
            oldest = self._spool.oldest_pending_at() if self._spool is not None else None
        return max(time.time() - oldest, 0.0) if oldest is not None else 0.0

    def flush(self) -> int:
        """Ship everything spooled so far (and what was adopted); returns events shipped."""
        with self._shipping:
            with self._lock:
                spool = self._ensure_spool()
                spool.seal(self._carried())
            shipped = 0
            for segment in spool.ready():
                shipped += self._ship_segment(spool, segment)
        self.written += shipped
        return shipped

    def _carried(self) -> list[bytes]:
        lines = []
        for request in self._open.values():
            lines.append(_dumps({"open": request}))
        return lines

    def _ship_segment(self, spool: Spool, segment: Path) -> int:
        lines = [line for line in _lines(segment) if not line.startswith("{")]
        for first in range(0, len(lines), BATCH_SIZE):
            self.dead_lettered += _ship(lines[first : first + BATCH_SIZE])
        segment.unlink()
        spool.sealed_at.pop(segment.name, None)
        if segment.name in spool.adopted:
            spool.adopted.discard(segment.name)
        else:
            with self._lock:
                self.unshipped = max(self.unshipped - len(lines), 0)
        return len(lines)

    def adopt_dead(self) -> list[Interrupted]:
        """Take over the segments of dead writers on this host and close their open requests.

        Their rows are shipped with this writer's; the requests they left open get an
        interrupted row here, and are returned for the caller to release in the limiter.
        """
        directory = self._spool_dir
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / ADOPTION_LOCK).open("a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
            with self._shipping:
                if self._closed:
                    return []
                with self._lock:
                    spool = self._ensure_spool()
                closed: list[Interrupted] = []
                for owner, segments in spool.dead_owners().items():
                    closed.extend(self._adopt(spool, owner, segments))
        return closed

    def _adopt(self, spool: Spool, owner: str, segments: list[Path]) -> list[Interrupted]:
        adopted = []
        for segment in segments:
            with self._lock:
                target = spool.next_path("ready")
            segment.rename(target)
            spool.adopted.add(target.name)
            spool.sealed_at[target.name] = target.stat().st_mtime
            adopted.append(target)
        still_open = _still_open(adopted)
        closed = []
        now = time.time()
        with self._lock:
            for request in still_open:
                spool.append(_dumps(event_row(interrupted_event(request, now))), event=True)
                charged = request.prompt_tokens + request.completion_tokens
                closed.append(Interrupted(request.request_id, request.scopes, charged))
            # Shipped with this writer's own segment, so part of its backlog until then.
            self.unshipped += len(still_open)
        with contextlib.suppress(FileNotFoundError):
            (self._spool_dir / f"{owner}.lock").unlink()
        if adopted or still_open:
            log.warning(
                "ledger: adopted %d segment(s) of %s; %d request(s) closed as interrupted",
                len(adopted), owner, len(still_open),
            )  # fmt: skip
        return closed

    def _run(self) -> None:
        backoff = self._flush_seconds
        while not self._stop.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.flush()
                backoff = self._flush_seconds
            except Exception:
                backoff = min(backoff * 2, 30.0)
                log.exception("ledger shipping failed; %d events wait on disk", self.pending)
            finally:
                close_old_connections()

    def close(self) -> None:
        """Stop the thread, ship what is left (or leave it on disk for the next start). Waits
        for an adoption in progress (it ships under the same lock) and forbids new ones."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            self._wake.set()
            thread.join(timeout=30)
        if self._spool is None:
            return
        try:
            self.flush()
        except Exception:
            log.exception("ledger: %d events stay in the spool for the next start", self.pending)
        finally:
            close_old_connections()
        with self._lock:
            if self._spool is not None:
                self._spool.close()
                self._spool = None


def _still_open(segments: list[Path]) -> list[OpenRequest]:
    """Requests opened in these segments (read in order) that never got their row."""
    opened: dict[str, OpenRequest] = {}
    for segment in segments:
        for line in _lines(segment):
            if line.startswith("["):
                with contextlib.suppress(ValueError, IndexError, TypeError):
                    opened.pop(str(json.loads(line)[0]), None)
                continue
            try:
                record = json.loads(line)
                if "open" in record:
                    request = OpenRequest(**record["open"])
                    opened[request.request_id] = request
                elif record.get("progress") in opened:
                    request = opened[record["progress"]]
                    request.completion_tokens = int(record["tokens"])
                    request.responded = bool(record["responded"])
            except (ValueError, TypeError, KeyError, AttributeError):
                log.warning("%s: skipping an unreadable line", segment)
    return list(opened.values())


def _lines(segment: Path) -> list[str]:
    # A process killed mid-write can leave a torn last line: skip it rather than block the rest.
    text = segment.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1]:
        log.warning("%s: dropping a torn last line", segment)
    return [line for line in lines[:-1] if line]


def _dumps(value: Any) -> bytes:
    # orjson: dataclasses natively, 3x faster than json + asdict (bench/ledger_bench.py). What
    # it refuses (a lone surrogate) cannot reach it: rows are cleaned, open lines hold our own
    # values; a NUL is escaped.
    return orjson.dumps(value)


def event_row(e: UsageEvent) -> tuple[Any, ...]:
    """The event as a ledger row (LEDGER_COLUMNS order, times as epoch), fitted to its columns."""
    return clean_row(
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
        ),
        time.time,
    )


def _ship(lines: list[str]) -> int:
    """Ship spooled rows (JSON text); returns how many were dead-lettered (embedded mode)."""
    if settings.REDIS_URL:
        from quotas import ledger_stream

        client = _stream_clients.get(settings.REDIS_URL)
        if client is None:
            client = _stream_clients[settings.REDIS_URL] = ledger_stream.client()
        ledger_stream.append_lines(client, lines)
        return 0
    from quotas.services import record_usage_lines

    return record_usage_lines(lines, "spool")


_stream_clients: dict[str, Any] = {}  # by URL: one connection pool per Redis
