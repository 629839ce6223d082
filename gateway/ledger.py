"""Usage events leave the request path as lines appended to a local spool file.

The request path pays for serialising and one buffered `write` per line (microseconds, see
docs/benchmarks.md); the line is then in the OS's hands, so a crash of this process loses
nothing it wrote. Three kinds of line:
- `{"open": …}` when a request is admitted (write-ahead): who, what was reserved, the limiter
  scopes to release;
- `{"progress": …}` every GATEWAY_LEDGER_CHECKPOINT_SECONDS of a stream: output so far;
- the ledger row (`UsageRow`, tokenlimit/ledger_rows.py) when the request is finished.
Every GATEWAY_LEDGER_FLUSH_SECONDS the writer thread seals the current segment (the new one
starts with the open requests again, so a request's open line is always in an unshipped
segment) and ships its rows: with REDIS_URL to the ledger stream (Celery's `drain_ledger`
writes the database, quotas/ledger_stream.py), without it straight into the database,
replay-safe by request id. A segment is deleted once shipped into the database; one shipped to
Redis is kept LEDGER_SHIPPED_RETENTION_SECONDS and shipped again if Redis restarts meanwhile.

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

from tokenlimit.ledger_rows import INTERRUPTED, UsageRow, clean_row, request_id_of, wire_line

log = logging.getLogger(__name__)
BATCH_SIZE = 1000
ADOPTION_LOCK = "adopting.flock"
_NOT_ROWS = (
    '{"open"',
    '{"progress"',
)  # write-ahead lines: read by adoption, never shipped  # one adopter at a time on this host


@dataclass(slots=True)
class RequestFacts:
    """What the ledger knows of a request before its outcome: who, what, when. Written ahead
    when the request is admitted, with enough to bill and release it if this process dies
    before it finishes."""

    request_id: str
    user_id: int
    api_key_id: int
    model: str  # the served model ("" when refused before one was resolved)
    endpoint: str
    streamed: bool
    started_at: float
    prompt_tokens: int = 0  # the gateway's count: what the upstream processes first
    # Limiter scopes holding the reservation: [key, rpm, tpm, tph, tpd, cooldown, parallel].
    scopes: list[list[Any]] = field(default_factory=list)
    completion_tokens: int = 0  # as of the last checkpoint
    responded: bool = False  # a 200 and its headers went out (a stream had started)


@dataclass(slots=True)
class Outcome:
    """How a request ended: its status, what it used, and why it failed if it did."""

    status: int
    prompt_tokens: int = 0  # billed
    completion_tokens: int = 0
    cached_tokens: int = 0
    usage_source: str = "none"
    error_type: str = ""
    client_disconnected: bool = False
    upstream_latency_ms: float | None = None
    time_to_first_token_ms: float | None = None
    upstream: str = ""


def usage_row(facts: RequestFacts, outcome: Outcome, finished_at: float | None = None) -> UsageRow:
    """The one way a request becomes its ledger row, whatever the outcome: refused, failed,
    finished, interrupted."""
    return UsageRow(
        request_id=facts.request_id,
        user_id=facts.user_id,
        api_key_id=facts.api_key_id,
        model=facts.model,
        endpoint=facts.endpoint,
        status_code=outcome.status,
        streamed=facts.streamed,
        started_at=facts.started_at,
        finished_at=time.time() if finished_at is None else finished_at,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        cached_tokens=outcome.cached_tokens,
        estimated_prompt_tokens=facts.prompt_tokens,
        usage_source=outcome.usage_source,
        error_type=outcome.error_type,
        client_disconnected=outcome.client_disconnected,
        upstream_latency_ms=outcome.upstream_latency_ms,
        time_to_first_token_ms=outcome.time_to_first_token_ms,
        upstream=outcome.upstream,
    )


@dataclass(frozen=True, slots=True)
class Interrupted:
    """A dead process's request closed by adoption: the caller releases its reservation."""

    request_id: str
    scopes: list[list[Any]]
    charged: int


def interrupted(facts: RequestFacts) -> Outcome:
    """A request whose gateway died: charged the prompt (the upstream processed it first) and
    the output the last checkpoint saw; 200 if a stream had started, else 502."""
    return Outcome(
        status=200 if facts.responded else 502,
        prompt_tokens=facts.prompt_tokens,
        completion_tokens=facts.completion_tokens,
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
        segments = ("*.open", "*.ready", "*.shipped")
        for path in [p for pattern in segments for p in self.directory.glob(pattern)]:
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
        self._open: dict[str, RequestFacts] = {}
        # Segments shipped to Redis and kept a while: path → (Redis run id, when shipped).
        self._retained: dict[Path, tuple[str, float]] = {}
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

    def open(self, request: RequestFacts) -> None:
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

    def record(self, row: UsageRow) -> None:
        line = wire_line(clean_row(row, time.time))
        with self._lock:
            self._open.pop(row.request_id, None)
            if self.unshipped >= self._max_pending:
                # A destination down for long must not fill the disk; say so loudly.
                self.dropped += 1
                log.error("ledger spool full (%d); dropping %s", self._max_pending, row.request_id)
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
            if settings.REDIS_URL and self._retained:  # nothing kept: no question to Redis
                self._reship_if_redis_restarted()
        self.written += shipped
        return shipped

    def _carried(self) -> list[bytes]:
        lines = []
        for request in self._open.values():
            lines.append(_dumps({"open": request}))
        return lines

    def _ship_segment(self, spool: Spool, segment: Path) -> int:
        lines = _rows(segment)
        # Asked before shipping: a restart during the XADDs must count as one after them.
        run_id = _redis_run_id() if settings.REDIS_URL else ""
        for first in range(0, len(lines), BATCH_SIZE):
            self.dead_lettered += _ship(lines[first : first + BATCH_SIZE])
        if settings.REDIS_URL:
            # Kept until Redis has surely persisted it (see _reship_if_redis_restarted).
            kept = segment.with_suffix(".shipped")
            segment.rename(kept)
            self._retained[kept] = (run_id, time.time())
        else:
            segment.unlink()
        spool.sealed_at.pop(segment.name, None)
        if segment.name in spool.adopted:
            spool.adopted.discard(segment.name)
        else:
            with self._lock:
                self.unshipped = max(self.unshipped - len(lines), 0)
        return len(lines)

    def _reship_if_redis_restarted(self) -> None:
        """Ship again what Redis may have lost. An XADD is acknowledged before Redis writes its
        append-only file (`everysec`: within about a second, later when the disk is slow), so a
        Redis killed right after could lose it. Shipped segments are kept on disk for
        LEDGER_SHIPPED_RETENTION_SECONDS; if Redis restarted meanwhile (its run id changed),
        they are shipped again (the worker skips rows it already wrote)."""
        now, current = time.time(), _redis_run_id()
        for segment, (run_id, shipped_at) in list(self._retained.items()):
            if run_id != current:
                log.warning("ledger: Redis restarted; shipping %s again", segment.name)
                lines = _rows(segment)
                for first in range(0, len(lines), BATCH_SIZE):
                    _ship(lines[first : first + BATCH_SIZE])
                self._retained[segment] = (current, now)
            elif now - shipped_at > settings.LEDGER_SHIPPED_RETENTION_SECONDS:
                segment.unlink(missing_ok=True)
                del self._retained[segment]

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
                row = usage_row(request, interrupted(request), finished_at=now)
                spool.append(wire_line(clean_row(row, time.time)), event=True)
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


def _still_open(segments: list[Path]) -> list[RequestFacts]:
    """Requests opened in these segments (read in order) that never got their row."""
    opened: dict[str, RequestFacts] = {}
    for segment in segments:
        for line in _lines(segment):
            try:
                record = json.loads(line)
                if isinstance(record, dict) and "open" in record:
                    request = RequestFacts(**record["open"])
                    opened[request.request_id] = request
                elif isinstance(record, dict) and "progress" in record:
                    if record["progress"] in opened:
                        request = opened[record["progress"]]
                        request.completion_tokens = int(record["tokens"])
                        request.responded = bool(record["responded"])
                else:  # a finished row, of any schema version
                    opened.pop(request_id_of(record), None)
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


def _rows(segment: Path) -> list[str]:
    return [line for line in _lines(segment) if not line.startswith(_NOT_ROWS)]


def _stream_client() -> Any:
    from quotas import ledger_stream

    client = _stream_clients.get(settings.REDIS_URL)
    if client is None:
        client = _stream_clients[settings.REDIS_URL] = ledger_stream.client()
    return client


def _redis_run_id() -> str:
    """Redis's run id: a new one each time the server starts."""
    return str(_stream_client().info("server")["run_id"])


def _ship(lines: list[str]) -> int:
    """Ship spooled rows (JSON text); returns how many were dead-lettered (embedded mode)."""
    if settings.REDIS_URL:
        from quotas import ledger_stream

        ledger_stream.append_lines(_stream_client(), lines)
        return 0
    from quotas.services import record_usage_lines

    return record_usage_lines(lines, "spool")


_stream_clients: dict[str, Any] = {}  # by URL: one connection pool per Redis
