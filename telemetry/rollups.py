"""Usage roll-ups: the ledger summed per user × model × minute, hour and day.

A roll-up cell is always *recomputed* from the ledger rows it covers, never incremented, so
running a roll-up twice changes nothing and a late ledger row is absorbed by recomputing the
minute, hour and day cells it falls into.

Definitions (one cell = one user, one model, one period):
- Buckets are by `started_at`. Minute and hour cells start on UTC boundaries; day cells start at
  local midnight in settings.LIMITER_TIME_ZONE (Asia/Seoul). With a whole-hour offset such as
  Seoul's (+09:00, no DST) local midnight is a UTC hour boundary, so hour cells nest in day cells.
- `requests` counts every ledger row: successes, errors and 429s alike.
- Token sums are over every row. A row carries what settlement charged (0 for a refusal or a
  failure before any output; the generated tokens for a client disconnect), so the sums are
  what was billed.
- `errors`: rows with status >= 400 other than 429, as {error_type: count}; a row without an
  error type counts as "http_<status>" (a client disconnect is 499 without one).
- `rate_limited`: the 429s, as {limit kind: count} (error_type: "requests", "tokens", …).
  Refused requests are written with model "" by the gateway, so they form a cell of their own.
- Latency: finished_at − started_at in ms, over every row of the cell; TTFT: the non-null
  time_to_first_token_ms values. Percentiles are exact, by nearest rank (`nearest_rank`).

Sums are aggregated by the database (one grouped query per batch of periods); percentiles need
every value, so latencies are streamed ordered by cell and reduced one cell at a time. A
recomputation therefore costs a constant number of queries, never one per ledger row.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import groupby
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Max, Q, QuerySet, Sum
from django.db.models.functions import TruncDay, TruncHour, TruncMinute
from django.utils import timezone

from quotas.models import UsageRecord
from telemetry.models import Period, RollupCursor, UsageRollup

log = logging.getLogger(__name__)

PERIODS: tuple[str, ...] = (Period.MINUTE.value, Period.HOUR.value, Period.DAY.value)
UNIQUE_FIELDS = ["period", "period_start", "user", "model"]  # constraint one_rollup_per_cell
VALUE_FIELDS = [
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
]

# A ledger transaction that commits up to this long after it took its ids is still rolled up
# (see Watermark); its rows are read again by every run within this time.
LATE_COMMIT_SECONDS = 300
# Ledger rows a single roll_up_recent takes on; a larger backlog is worked off over the next runs.
MAX_ROWS_PER_RUN = 100_000
# Above this many users in one span, a recomputation covers every user of the span.
MAX_USERS_PER_SPAN = 300
# Bound parameters per ledger query (SQLite's historic limit is 999).
MAX_QUERY_PARAMS = 900


# --- Periods ------------------------------------------------------------------------------------


def local_zone() -> ZoneInfo:
    return ZoneInfo(settings.LIMITER_TIME_ZONE)


def local_midnight(day: date) -> datetime:
    """The start of `day` in LIMITER_TIME_ZONE, as an aware datetime."""
    return datetime.combine(day, time(), tzinfo=local_zone())


def period_floor(period: str, moment: datetime) -> datetime:
    """The start of the `period` cell that contains `moment`."""
    if period == Period.MINUTE:
        return moment.astimezone(UTC).replace(second=0, microsecond=0)
    if period == Period.HOUR:
        return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if period == Period.DAY:
        return local_midnight(moment.astimezone(local_zone()).date())
    raise ValueError(f"unknown period {period!r}")


def period_after(period: str, start: datetime) -> datetime:
    """The start of the cell after the one starting at `start`."""
    if period == Period.MINUTE:
        return start + timedelta(minutes=1)
    if period == Period.HOUR:
        return start + timedelta(hours=1)
    if period == Period.DAY:
        return local_midnight(start.astimezone(local_zone()).date() + timedelta(days=1))
    raise ValueError(f"unknown period {period!r}")


def _bucket(period: str) -> TruncMinute | TruncHour | TruncDay:
    # The same buckets as period_floor, computed by the database. Both backends return the
    # truncated wall time, which Django makes aware in `tzinfo` again (SQLite through Django's
    # own Python function, PostgreSQL through AT TIME ZONE), so both give the same instants.
    if period == Period.MINUTE:
        return TruncMinute("started_at", tzinfo=UTC)
    if period == Period.HOUR:
        return TruncHour("started_at", tzinfo=UTC)
    if period == Period.DAY:
        return TruncDay("started_at", tzinfo=local_zone())
    raise ValueError(f"unknown period {period!r}")


# --- Percentiles --------------------------------------------------------------------------------


def nearest_rank(values: Sequence[float], percent: int) -> float | None:
    """The nearest-rank percentile: the smallest value with at least `percent` % of all values
    at or below it, i.e. sorted(values)[ceil(percent / 100 × n) − 1]. Always one of the values
    (no interpolation); None when there are none.

    >>> nearest_rank([1000, 3000, 2000], 50), nearest_rank([1000, 3000, 2000], 95)
    (2000.0, 3000.0)
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    if not values:
        return None
    ordered = sorted(values)
    rank = -(-percent * len(ordered) // 100)  # ceil in integers: no floating-point rounding
    return float(ordered[rank - 1])


# --- Recomputing cells --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Span:
    """Ledger rows to recompute: started in [start, end), of `users` (None: every user)."""

    start: datetime
    end: datetime
    users: frozenset[int | None] | None = None

    def condition(self) -> Q:
        match = Q(started_at__gte=self.start, started_at__lt=self.end)
        if self.users is None:
            return match
        ids = sorted(user for user in self.users if user is not None)
        who = Q(user_id__in=ids) if ids else Q(pk__in=[])
        if None in self.users:
            who |= Q(user_id__isnull=True)
        return match & who

    @property
    def params(self) -> int:
        return 2 + (len(self.users) if self.users is not None else 0)


CellKey = tuple[int | None, str, datetime]


def _cells(period: str, rows: QuerySet[UsageRecord]) -> list[UsageRollup]:
    """The cells of `period` for the ledger rows `rows`: three queries, whatever their number."""
    ledger = rows.annotate(cell_start=_bucket(period))
    key = ("user_id", "model", "cell_start")
    cells: dict[CellKey, UsageRollup] = {}
    sums = (
        ledger.values(*key)
        .annotate(
            n=Count("pk"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            cached=Sum("cached_tokens"),
        )
        .order_by()
    )
    for row in sums:
        cells[(row["user_id"], row["model"], row["cell_start"])] = UsageRollup(
            period=period,
            period_start=row["cell_start"],
            user_id=row["user_id"],
            model=row["model"],
            requests=row["n"],
            prompt_tokens=row["prompt"] or 0,
            completion_tokens=row["completion"] or 0,
            cached_tokens=row["cached"] or 0,
            errors={},
            rate_limited={},
        )
    outcomes = (
        ledger.filter(status_code__gte=400)
        .values(*key, "status_code", "error_type")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for row in outcomes:
        cell = cells.get((row["user_id"], row["model"], row["cell_start"]))
        if cell is None:
            continue  # committed between the two queries: the next run recomputes the cell
        if row["status_code"] == 429:
            kind = row["error_type"] or "unknown"
            cell.rate_limited[kind] = cell.rate_limited.get(kind, 0) + row["n"]
        else:
            kind = row["error_type"] or f"http_{row['status_code']}"
            cell.errors[kind] = cell.errors.get(kind, 0) + row["n"]
    timings = (
        ledger.order_by(*key)
        .values_list(*key, "started_at", "finished_at", "time_to_first_token_ms")
        .iterator(chunk_size=5000)
    )
    # Ordered by cell: only one cell's values are held at a time.
    for cell_key, group in groupby(timings, key=lambda row: row[:3]):
        cell = cells.get(cell_key)
        latencies: list[float] = []
        ttfts: list[float] = []
        for *_, started, finished, ttft in group:
            latencies.append((finished - started) / timedelta(milliseconds=1))
            if ttft is not None:
                ttfts.append(ttft)
        if cell is None:
            continue
        cell.latency_p50_ms = nearest_rank(latencies, 50)
        cell.latency_p95_ms = nearest_rank(latencies, 95)
        cell.ttft_p50_ms = nearest_rank(ttfts, 50)
        cell.ttft_p95_ms = nearest_rank(ttfts, 95)
    return list(cells.values())


def _store(cells: list[UsageRollup]) -> int:
    """Upsert the cells on one_rollup_per_cell; returns how many were written."""
    keyed = [cell for cell in cells if cell.user_id is not None]
    if keyed:
        UsageRollup.objects.bulk_create(
            keyed,
            update_conflicts=True,
            unique_fields=UNIQUE_FIELDS,
            update_fields=[*VALUE_FIELDS, "updated_at"],
        )
    # A unique constraint never matches NULL, so rows without a user cannot be upserted: their
    # old cells are replaced instead. (The gateway always writes a user; this is for safety.)
    orphans = [cell for cell in cells if cell.user_id is None]
    for chunk in _chunks(orphans, 200):
        same = Q()
        for cell in chunk:
            same |= Q(period=cell.period, period_start=cell.period_start, model=cell.model)
        UsageRollup.objects.filter(same, user__isnull=True).delete()
        UsageRollup.objects.bulk_create(chunk)
    return len(cells)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for first in range(0, len(items), size):
        yield items[first : first + size]


def _batches(spans: Iterable[_Span]) -> Iterator[list[_Span]]:
    """Spans grouped so that no ledger query has more than MAX_QUERY_PARAMS parameters."""
    batch: list[_Span] = []
    params = 0
    for span in spans:
        if batch and params + span.params > MAX_QUERY_PARAMS:
            yield batch
            batch, params = [], 0
        batch.append(span)
        params += span.params
    if batch:
        yield batch


def _recompute(period: str, spans: Iterable[_Span], up_to_id: int) -> int:
    """Recompute the cells of `period` covered by `spans` from ledger rows with id <= up_to_id
    (the same rows for all three queries; rows above it are the next run's)."""
    written = 0
    for batch in _batches(spans):
        match = Q()
        for span in batch:
            match |= span.condition()
        rows = UsageRecord.objects.filter(match, pk__lte=up_to_id)
        written += _store(_cells(period, rows))
    return written


def _check_period(period: str) -> str:
    if period not in PERIODS:
        raise ValueError(f"period must be one of {PERIODS}, got {period!r}")
    return period


def roll_up(period: str, start: datetime, end: datetime) -> int:
    """Recompute every (user, model, period_start) cell of `period` whose period intersects
    [start, end) from the ledger and upsert it; returns the number of cells written.

    Cells without ledger rows are left alone: pruned history keeps its roll-ups.
    """
    _check_period(period)
    if timezone.is_naive(start) or timezone.is_naive(end):
        raise ValueError("start and end must be aware datetimes")
    if start >= end:
        raise ValueError(f"start {start} is not before end {end}")
    first = period_floor(period, start)
    last = period_floor(period, end)
    stop = last if last == end else period_after(period, last)
    with transaction.atomic():
        up_to = UsageRecord.objects.aggregate(top=Max("pk"))["top"] or 0
        return _recompute(period, [_Span(first, stop)], up_to)


def rebuild(start: datetime, end: datetime) -> dict[str, int]:
    """roll_up for every period over [start, end): a repair, e.g. for ledger rows that
    committed later than roll_up_recent's re-read window (see Watermark)."""
    return {period: roll_up(period, start, end) for period in PERIODS}


# --- The minute-by-minute run -------------------------------------------------------------------


@dataclass(frozen=True)
class Watermark:
    """How far roll_up_recent has read the ledger, by primary key.

    Late rows (a batch written minutes or hours after its requests, e.g. after a worker outage)
    have old timestamps but new ids: ledger ids are handed out at insert time, so "id above the
    watermark" finds exactly the rows inserted since the last run, however old their
    `started_at`. Timestamps cannot (a late row is not newer by started_at or finished_at), and
    the ledger has no insertion time.

    One catch: on PostgreSQL several writers (gateway replicas, drain workers) insert at once,
    and a transaction may commit *after* another one that took higher ids; a run in between
    sees the higher ids but not the lower ones. So every run also reads again the ids taken
    since the run of LATE_COMMIT_SECONDS ago (`runs` remembers where each recent run stopped):
    a ledger transaction that commits within LATE_COMMIT_SECONDS minus one run interval of
    taking its ids is never missed. Re-reading costs little: those rows lie in the cells the
    new rows make a run recompute anyway. (Until the first run is LATE_COMMIT_SECONDS old, the
    oldest run stands in.) SQLite has one writer at a time; there ids commit in order.
    """

    rolled_up_to: int = 0
    runs: tuple[tuple[float, int], ...] = ()  # (epoch seconds, rolled_up_to), oldest first

    def rescan_floor(self, now: datetime) -> int:
        """Ledger ids above this are read by the run at `now`."""
        horizon = now.timestamp() - LATE_COMMIT_SECONDS
        older = [top for when, top in self.runs if when <= horizon]
        if older:
            return min(older[-1], self.rolled_up_to)
        return min(self.runs[0][1], self.rolled_up_to) if self.runs else self.rolled_up_to

    def advanced(self, now: datetime, top: int) -> Watermark:
        runs = [*self.runs, (now.timestamp(), top)]
        horizon = now.timestamp() - LATE_COMMIT_SECONDS
        # The newest run at or before the horizon is the next floor: older ones are not needed.
        keep = max((i for i, (when, _) in enumerate(runs) if when <= horizon), default=0)
        return Watermark(rolled_up_to=top, runs=tuple(runs[keep:]))

    def as_json(self) -> dict[str, Any]:
        return {"rolled_up_to": self.rolled_up_to, "runs": [list(run) for run in self.runs]}

    @classmethod
    def from_json(cls, data: Any) -> Watermark:
        if not isinstance(data, dict) or "rolled_up_to" not in data:
            return cls()
        runs = tuple((float(when), int(top)) for when, top in data.get("runs", []))
        return cls(rolled_up_to=int(data["rolled_up_to"]), runs=runs)


WATERMARK_NAME = "usage_rollups"


def get_watermark() -> Watermark:
    """The watermark; inside a transaction its row is locked (SELECT … FOR UPDATE on PostgreSQL;
    SQLite's transactions hold the database's write lock), which serialises roll_up_recent."""
    lock = connection.in_atomic_block  # FOR UPDATE is refused outside a transaction
    rows = RollupCursor.objects.select_for_update() if lock else RollupCursor.objects.all()
    row = rows.filter(name=WATERMARK_NAME).first()
    if row is None:  # the first run ever; a concurrent first run fails over to a get
        created, _ = RollupCursor.objects.get_or_create(name=WATERMARK_NAME)
        row = rows.get(pk=created.pk)
    return Watermark.from_json(row.state)


def set_watermark(mark: Watermark) -> None:
    updated = RollupCursor.objects.filter(name=WATERMARK_NAME).update(
        state=mark.as_json(), updated_at=timezone.now()
    )
    if not updated:
        RollupCursor.objects.create(name=WATERMARK_NAME, state=mark.as_json())


def ledger_cutoff(now: datetime | None = None) -> datetime:
    """Ledger rows that started before this are past LEDGER_RETENTION_DAYS: local midnight, so
    that whole local days go and no day cell is ever recomputed from half a day."""
    moment = (now or timezone.now()).astimezone(local_zone())
    return local_midnight((moment - timedelta(days=settings.LEDGER_RETENTION_DAYS)).date())


def _next_top(after: int) -> tuple[int, int]:
    """(highest id of the next at most MAX_ROWS_PER_RUN rows after `after`, how many rows)."""
    window = UsageRecord.objects.filter(pk__gt=after).order_by("pk")[:MAX_ROWS_PER_RUN]
    got = window.aggregate(top=Max("pk"), rows=Count("pk"))
    return (got["top"] or after), got["rows"]


def _touched(low: int, high: int, since: datetime) -> set[tuple[int | None, datetime]]:
    """(user, UTC minute) of the ledger rows low < id <= high that started at or after `since`."""
    rows = (
        UsageRecord.objects.filter(pk__gt=low, pk__lte=high, started_at__gte=since)
        .annotate(minute=TruncMinute("started_at", tzinfo=UTC))
        .values_list("user_id", "minute")
        .order_by()
        .distinct()
    )
    return set(rows)


def _spans(period: str, touched: Iterable[tuple[int | None, datetime]]) -> list[_Span]:
    """The cells of `period` holding the touched minutes, adjacent ones merged into spans."""
    users_by_start: dict[datetime, set[int | None]] = defaultdict(set)
    for user, minute in touched:
        users_by_start[period_floor(period, minute)].add(user)
    spans: list[_Span] = []
    for cell_start in sorted(users_by_start):
        start = cell_start
        users: frozenset[int | None] | None = frozenset(users_by_start[cell_start])
        if spans and spans[-1].end == cell_start:
            previous = spans.pop()
            users = None if previous.users is None or users is None else previous.users | users
            start = previous.start
        if users is not None and len(users) > MAX_USERS_PER_SPAN:
            users = None
        spans.append(_Span(start, period_after(period, cell_start), users))
    return spans


@dataclass
class RunReport:
    from_id: int
    to_id: int
    new_rows: int
    caught_up: bool
    cells: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "from_id": self.from_id,
            "to_id": self.to_id,
            "new_rows": self.new_rows,
            "caught_up": self.caught_up,
            "cells": dict(self.cells),
        }


def roll_up_recent(now: datetime | None = None) -> dict[str, Any]:
    """Recompute the cells touched by ledger rows inserted since the last run (beat: every
    minute); returns what it did.

    Reads the ledger ids above the watermark (plus the re-read window, see Watermark), finds the
    distinct (user, minute) they fall into, and recomputes for each period exactly the minute,
    hour and day cells holding them, for those users; then advances the watermark in the same
    transaction. So a late row for a long rolled-up minute changes that minute, its hour and its
    day, and a run without new rows writes nothing new. Rows older than the ledger retention
    are skipped (they are about to be pruned, and their day may be gone already).
    """
    now = now or timezone.now()
    with transaction.atomic():
        mark = get_watermark()
        floor = mark.rescan_floor(now)
        top, new_rows = _next_top(mark.rolled_up_to)
        report = RunReport(floor, top, new_rows, caught_up=new_rows < MAX_ROWS_PER_RUN)
        touched = _touched(floor, top, ledger_cutoff(now)) if top > floor else set()
        for period in PERIODS:
            report.cells[period] = _recompute(period, _spans(period, touched), top)
        set_watermark(mark.advanced(now, top))
    if not report.caught_up:
        log.info("usage roll-up: backlog left after ledger id %d", top)
    return report.as_dict()


# --- Retention ----------------------------------------------------------------------------------


def prune_ledger(now: datetime | None = None, batch_size: int = 10_000) -> int:
    """Delete ledger rows older than LEDGER_RETENTION_DAYS (whole local days); roll-ups stay.

    Only rows at or below the watermark go: a row not rolled up yet is kept until it is, so
    pruning never loses usage from the roll-ups. Deleted in batches, each its own statement,
    so no long lock is held on the ledger. Returns how many rows went.
    """
    cutoff = ledger_cutoff(now)
    with transaction.atomic():
        rolled_up_to = get_watermark().rolled_up_to
    expired = UsageRecord.objects.filter(started_at__lt=cutoff, pk__lte=rolled_up_to)
    deleted = 0
    while True:
        ids = list(expired.order_by("pk").values_list("pk", flat=True)[:batch_size])
        if not ids:
            return deleted
        count, _ = UsageRecord.objects.filter(pk__in=ids).delete()
        deleted += count
