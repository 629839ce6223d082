"""CSV exports of usage by user and period: from the roll-ups, or the raw ledger.

The file is UTF-8 with a byte-order mark, so that Excel recognises the encoding and shows
Korean usernames; the first row is the header (stable column names for scripts). Times are in
LIMITER_TIME_ZONE with their offset. Rows are streamed from a server-side cursor
(`QuerySet.iterator`) and written one at a time, so memory stays constant however long the
export is. Used by `manage.py export_usage` and the admin's CSV action.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from django.contrib.auth.models import User
from django.db.models import QuerySet

from quotas.models import UsageRecord
from telemetry.models import UsageRollup
from telemetry.rollups import PERIODS, local_midnight, local_zone

RAW = "raw"
EXPORT_PERIODS: tuple[str, ...] = (*PERIODS, RAW)
BOM = "\ufeff"
CHUNK_SIZE = 2000

ROLLUP_HEADER = (
    "period",
    "period_start",
    "user_id",
    "username",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
    "errors",
    "errors_by_type",
    "rate_limited",
    "rate_limited_by_limit",
    "latency_p50_ms",
    "latency_p95_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
)
_ROLLUP_FIELDS = (
    "period",
    "period_start",
    "user_id",
    "user__username",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "errors",
    "rate_limited",
    "latency_p50_ms",
    "latency_p95_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
)
RAW_HEADER = (
    "request_id",
    "started_at",
    "finished_at",
    "latency_ms",
    "user_id",
    "username",
    "api_key_id",
    "model",
    "endpoint",
    "status_code",
    "error_type",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "estimated_prompt_tokens",
    "usage_source",
    "streamed",
    "client_disconnected",
    "upstream_latency_ms",
    "time_to_first_token_ms",
    "upstream",
)
_RAW_FIELDS = (
    "request_id",
    "started_at",
    "finished_at",
    "user_id",
    "user__username",
    "api_key_id",
    "model",
    "endpoint",
    "status_code",
    "error_type",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "estimated_prompt_tokens",
    "usage_source",
    "streamed",
    "client_disconnected",
    "upstream_latency_ms",
    "time_to_first_token_ms",
    "upstream",
)


# --- Cell formatting ----------------------------------------------------------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _number(value: float | None) -> str:
    """Up to three decimals, no trailing zeros: 2000.0 → "2000", 1234.5678 → "1234.568"."""
    if value is None:
        return ""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _moment(value: datetime, timespec: str = "seconds") -> str:
    return value.astimezone(local_zone()).isoformat(sep=" ", timespec=timespec)


def _counts(value: dict[str, int] | None) -> str:
    return json.dumps(value or {}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _rollup_row(row: tuple[Any, ...]) -> list[str]:
    (period, start, user_id, username, model, requests, prompt, completion, cached, errors,
     limited, lat50, lat95, ttft50, ttft95) = row  # fmt: skip
    return [
        period,
        _moment(start),
        _text(user_id),
        _text(username),
        model,
        str(requests),
        str(prompt),
        str(completion),
        str(cached),
        str(prompt + completion),
        str(sum((errors or {}).values())),
        _counts(errors),
        str(sum((limited or {}).values())),
        _counts(limited),
        _number(lat50),
        _number(lat95),
        _number(ttft50),
        _number(ttft95),
    ]


def _raw_row(row: tuple[Any, ...]) -> list[str]:
    (request_id, started, finished, user_id, username, key_id, model, endpoint, status, error,
     prompt, completion, cached, estimated, source, streamed, disconnected, upstream_ms,
     ttft, upstream) = row  # fmt: skip
    return [
        request_id,
        _moment(started, "milliseconds"),
        _moment(finished, "milliseconds"),
        _number((finished - started) / timedelta(milliseconds=1)),
        _text(user_id),
        _text(username),
        _text(key_id),
        model,
        endpoint,
        str(status),
        error,
        str(prompt),
        str(completion),
        str(cached),
        str(estimated),
        source,
        _flag(streamed),
        _flag(disconnected),
        _number(upstream_ms),
        _number(ttft),
        upstream,
    ]


# --- Exports ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    """What to write: a header and a values_list queryset, formatted row by row."""

    header: tuple[str, ...]
    queryset: QuerySet[Any, Any]
    format_row: Callable[[tuple[Any, ...]], list[str]]

    def count(self) -> int:
        return self.queryset.count()

    def rows(self) -> Iterator[list[str]]:
        for row in self.queryset.iterator(chunk_size=CHUNK_SIZE):
            yield self.format_row(row)


def local_range(since: date, until: date) -> tuple[datetime, datetime]:
    """[local midnight of `since`, local midnight after `until`): both days included."""
    if until < since:
        raise ValueError(f"until {until} is before since {since}")
    return local_midnight(since), local_midnight(until + timedelta(days=1))


_ORDER = ("period", "period_start", "user_id", "model")


def rollup_export(rollups: QuerySet[UsageRollup]) -> Export:
    """The given roll-up cells (e.g. those selected in the admin), by period and start."""
    queryset = rollups.filter(period__in=PERIODS).order_by(*_ORDER)
    return Export(ROLLUP_HEADER, queryset.values_list(*_ROLLUP_FIELDS), _rollup_row)


def raw_export(records: QuerySet[UsageRecord]) -> Export:
    """The given ledger rows, by start time."""
    queryset = records.order_by("started_at", "pk").values_list(*_RAW_FIELDS)
    return Export(RAW_HEADER, queryset, _raw_row)


def usage_export(*, period: str, since: date, until: date, user: User | None = None) -> Export:
    """Usage from local midnight of `since` to the end of `until` (both days included): the
    roll-up cells of `period` starting in that range, or with period "raw" the ledger rows
    that started in it; optionally of one user."""
    if period not in EXPORT_PERIODS:
        raise ValueError(f"period must be one of {EXPORT_PERIODS}, got {period!r}")
    start, end = local_range(since, until)
    if period == RAW:
        records = UsageRecord.objects.filter(started_at__gte=start, started_at__lt=end)
        return raw_export(records if user is None else records.filter(user=user))
    rollups = UsageRollup.objects.filter(
        period=period, period_start__gte=start, period_start__lt=end
    )
    return rollup_export(rollups if user is None else rollups.filter(user=user))


class _Line:
    """A file-like object whose write returns what it was given: csv rows as strings."""

    def write(self, value: str) -> str:
        return value


def csv_lines(export: Export) -> Iterator[str]:
    """The CSV as lines: the BOM and header first, then one line per row (for streaming)."""
    writer = csv.writer(_Line())
    yield BOM + writer.writerow(export.header)
    for row in export.rows():
        yield writer.writerow(row)


def write_csv(
    write: Callable[[str], object],
    export: Export,
    progress: Callable[[int], object] | None = None,
    every: int = 500,
) -> int:
    """Write the CSV (BOM, header, rows) through `write`; returns the number of data rows.
    `progress(rows written so far)` is called every `every` rows and at the end."""
    lines = csv_lines(export)
    write(next(lines))
    written = 0
    for line in lines:
        write(line)
        written += 1
        if progress is not None and written % every == 0:
            progress(written)
    if progress is not None:
        progress(written)
    return written


# --- Progress -----------------------------------------------------------------------------------


class ProgressBar:
    """`  42% [############------------------] 4,200/10,000` on one line of a terminal.

    Interactive (a terminal): redrawn in place with a carriage return, at most every
    `interval` seconds. Otherwise (a log file) only the final state is written, once.
    """

    def __init__(
        self,
        write: Callable[[str], object],
        total: int,
        *,
        interactive: bool = True,
        width: int = 30,
        interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self.total = max(total, 0)
        self._interactive = interactive
        self._width = width
        self._interval = interval
        self._clock = clock
        self._drawn_at: float | None = None
        self.done = 0

    def render(self) -> str:
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(fraction * self._width)
        bar = "#" * filled + "-" * (self._width - filled)
        return f"{fraction:5.0%} [{bar}] {self.done:,}/{self.total:,}"

    def update(self, done: int) -> None:
        self.done = done
        if not self._interactive:
            return
        now = self._clock()
        if self._drawn_at is None or now - self._drawn_at >= self._interval:
            self._write("\r" + self.render())
            self._drawn_at = now

    def finish(self) -> None:
        self._write(("\r" if self._interactive else "") + self.render() + "\n")
