"""Usage reports for the REST API: a user's (or everyone's) usage per minute, hour or Seoul day,
and the operators' top users; exact up to the last committed ledger row, at a constant number
of queries.

Where the numbers come from
---------------------------
Two disjoint parts are added up:

1. the roll-up cells (telemetry/rollups.py): they hold every ledger row with
   id <= the watermark `rolled_up_to` (roll_up_recent writes cells and watermark in one
   transaction);
2. the *tail*: the ledger rows with id > that watermark, aggregated by the database into the
   same buckets.

Both parts are read by ONE SQL statement (UNION ALL) in which the tail's watermark is read by a
subquery. A statement sees one snapshot, so the cells and the watermark that splits them from
the tail always belong together, even when a roll-up run commits while a report is running. (Two
statements could not do this: a run committing between them moves rows from the tail into cells
that were read before, or the other way round.) The watermark is also read first, on its own,
and passed as a literal lower bound as well: that lets PostgreSQL's planner see how few rows the
tail has and take the primary-key index. The subquery's value is never lower (the watermark only
moves forward), so the literal changes the plan, never the rows.

What "exact" means
------------------
- No row is ever counted twice: a cell holds rows with id <= the watermark, the tail only rows
  above it. A late row for a long rolled-up minute counts in the tail until roll_up_recent
  rolls it up, then in its cell; the totals are the same before and after.
- Every committed ledger row counts, except a row whose transaction committed *after* a roll-up
  run had already read past its id (several writers on PostgreSQL; see rollups.Watermark):
  it is below the watermark but in no cell yet, so it shows from the next roll_up_recent run
  on, which re-reads the ids of the last LATE_COMMIT_SECONDS (i.e. about one beat interval,
  a minute, after its commit). A commit later than LATE_COMMIT_SECONDS is missing from the
  roll-ups and the reports alike until rollups.rebuild.
- Rows that arrive already older than LEDGER_RETENTION_DAYS count in the tail only until the
  next run passes them (roll_up_recent skips them, as they are about to be pruned).
- A manual rollups.roll_up/rebuild recomputes cells from every row committed at the time,
  including rows above the watermark: in the range it rebuilt, those rows count twice until the
  next roll_up_recent (a minute at most) moves the watermark past them.

With an API key filter (the roll-ups have no key dimension) the report is read from the ledger
alone, which keeps LEDGER_RETENTION_DAYS: older usage is no longer there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from django.db import NotSupportedError
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import (
    Aggregate,
    BigIntegerField,
    Count,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
)
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast, Coalesce, TruncDay, TruncHour, TruncMinute
from django.db.models.sql.compiler import SQLCompiler
from django.utils import timezone
from django.utils.translation import gettext

from quotas.models import UsageRecord
from telemetry.models import Period, RollupCursor, UsageRollup
from telemetry.rollups import (
    PERIODS,
    WATERMARK_NAME,
    Watermark,
    ledger_cutoff,
    local_zone,
    period_after,
    period_floor,
)

# The most buckets one report may have (e.g. 83 days hourly, 33 hours by the minute).
MAX_BUCKETS = 2_000
TOP_BY: tuple[str, ...] = ("tokens", "requests", "rate_limited")
MAX_TOP_USERS = 1_000
MAX_MODEL_LENGTH = 200  # UsageRecord.model / UsageRollup.model
MAX_ID = 2**63 - 1

Source = Literal["rollups", "ledger"]


# --- Results ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class UsageTotals:
    """Usage summed over some requests. `requests` counts every request (successes, 429s and
    errors alike); tokens are what was billed; `rate_limited`: refused with 429; `errors`:
    other statuses >= 400 (a client disconnect is 499)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = field(init=False)  # prompt + completion (cached is part of prompt)
    rate_limited: int = 0
    errors: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_tokens", self.prompt_tokens + self.completion_tokens)


@dataclass(frozen=True, kw_only=True, slots=True)
class UsageBucket(UsageTotals):
    """The requests that started in [start, start + one period)."""

    start: datetime  # aware, in LIMITER_TIME_ZONE


@dataclass(frozen=True, kw_only=True, slots=True)
class UsageReport:
    period: str  # "minute" | "hour" | "day"
    start: datetime  # the requested start floored to the period, aware (LIMITER_TIME_ZONE)
    end: datetime  # the requested end ceiled to the period (exclusive)
    user_id: int | None  # None: every user
    model: str | None  # None: every model; "" is the refused requests' model
    api_key_id: int | None
    # Sparse: only buckets in which at least one request started, oldest first.
    series: list[UsageBucket]
    totals: UsageTotals  # over [start, end)
    # Per model over [start, end): most tokens first, then most requests, then by name.
    by_model: list[tuple[str, UsageTotals]]
    # "rollups": roll-up cells plus the not yet rolled-up ledger rows (complete history).
    # "ledger": the raw ledger only (an API key filter), which keeps LEDGER_RETENTION_DAYS.
    source: Source
    # For source "ledger": usage that started before this may already be pruned. Else None.
    ledger_kept_since: datetime | None

    def filled_series(self) -> list[UsageBucket]:
        """`series` with a zero bucket for every period of [start, end) without usage."""
        have = {bucket.start: bucket for bucket in self.series}
        filled: list[UsageBucket] = []
        moment = self.start
        while moment < self.end:
            filled.append(have.get(moment) or UsageBucket(start=moment))
            moment = period_after(self.period, moment).astimezone(local_zone())
        return filled


@dataclass(frozen=True, kw_only=True, slots=True)
class TopUser(UsageTotals):
    user_id: int | None  # None only for ledger rows without a user (never written by the gateway)
    username: str | None  # None if the user no longer exists


# --- Summing ------------------------------------------------------------------------------------

# Every part of a UNION selects these aggregates, in this order, after its grouping columns.
_FIGURES = ("n", "prompt", "completion", "cached", "limited", "failed")


@dataclass(slots=True)
class _Sums:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    rate_limited: int = 0
    errors: int = 0

    def add(self, figures: Sequence[Any]) -> None:
        # PostgreSQL's SUM(bigint) is numeric (a Decimal here); None never comes (grouped rows).
        n, prompt, completion, cached, limited, failed = (int(value or 0) for value in figures)
        self.requests += n
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cached_tokens += cached
        self.rate_limited += limited
        self.errors += failed

    def merge(self, other: _Sums) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_kwargs(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class _SummedCounts(Aggregate):
    """Over a group of cells, the sum of the values of each cell's {kind: count} JSON object
    (`errors` or `rate_limited`): one number, computed by the database."""

    output_field = BigIntegerField()

    def as_sql(  # type: ignore[override]
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any
    ) -> tuple[str, tuple[Any, ...]]:
        raise NotSupportedError(f"usage reports do not support {connection.vendor}")

    def as_postgresql(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any
    ) -> tuple[str, tuple[Any, ...]]:
        # Per group, not per cell: the non-empty objects (most cells have none) gathered into
        # one array, their values flattened by a JSON path and summed by one subquery. A
        # subquery for every cell made an all-users month by the hour 3-4 times slower (and
        # its cost estimate switched on PostgreSQL's JIT compiler, slower still).
        sql, params = compiler.compile(self.get_source_expressions()[0])
        objects = f"jsonb_agg({sql}) FILTER (WHERE {sql} <> '{{}}'::jsonb)"
        values = f"jsonb_array_elements_text(jsonb_path_query_array({objects}, '$[*].*'))"
        return f"COALESCE((SELECT SUM(v::bigint) FROM {values} AS v), 0)", (*params, *params)

    def as_sqlite(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any
    ) -> tuple[str, tuple[Any, ...]]:
        # SQLite (the quick start, small tables): a subquery per non-empty cell is fine.
        sql, params = compiler.compile(self.get_source_expressions()[0])
        counts = f"(SELECT SUM(kv.value) FROM json_each({sql}) AS kv)"
        return f"COALESCE(SUM(CASE WHEN {sql} = '{{}}' THEN 0 ELSE {counts} END), 0)", (
            *params,
            *params,
        )


def _cell_figures() -> dict[str, Any]:
    return {
        "n": Sum("requests"),
        "prompt": Sum("prompt_tokens"),
        "completion": Sum("completion_tokens"),
        "cached": Sum("cached_tokens"),
        "limited": _SummedCounts("rate_limited"),
        "failed": _SummedCounts("errors"),
    }


def _row_figures() -> dict[str, Any]:
    # The roll-ups' definitions (rollups.py): 429s are rate_limited, any other >= 400 an error.
    return {
        "n": Count("pk"),
        "prompt": Sum("prompt_tokens"),
        "completion": Sum("completion_tokens"),
        "cached": Sum("cached_tokens"),
        "limited": Count("pk", filter=Q(status_code=429)),
        "failed": Count("pk", filter=Q(status_code__gte=400) & ~Q(status_code=429)),
    }


# --- The watermark ------------------------------------------------------------------------------


def _watermark() -> int:
    """rolled_up_to as it is now, read without a lock (a report must never wait for a run)."""
    state = RollupCursor.objects.filter(name=WATERMARK_NAME).values_list("state", flat=True).first()
    return Watermark.from_json(state).rolled_up_to


def _not_rolled_up(seen: int) -> Q:
    """Ledger rows above the watermark of the statement's own snapshot (the subquery), and
    above `seen`, the value read earlier, for the planner (see the module docstring)."""
    top = RollupCursor.objects.filter(name=WATERMARK_NAME).values(
        top=Cast(KeyTextTransform("rolled_up_to", "state"), BigIntegerField())
    )[:1]
    return Q(pk__gt=seen) & Q(pk__gt=Coalesce(Subquery(top), Value(0)))


# --- Arguments ----------------------------------------------------------------------------------


def _check_period(period: str) -> str:
    if period not in PERIODS:
        raise ValueError(
            gettext("Unknown period %(period)s: use minute, hour or day.") % {"period": period}
        )
    return period


def _check_id(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise ValueError(gettext("%(what)s must be a positive id.") % {"what": what})
    return value


def _check_model(model: str | None) -> str | None:
    if model is not None and len(model) > MAX_MODEL_LENGTH:
        raise ValueError(
            gettext("A model name has at most %(n)d characters.") % {"n": MAX_MODEL_LENGTH}
        )
    return model


def _check_range(start: datetime, end: datetime) -> None:
    if timezone.is_naive(start) or timezone.is_naive(end):
        raise ValueError(gettext("start and end need a time zone."))
    if end <= start:
        raise ValueError(gettext("start must be before end."))


def _ceil(period: str, moment: datetime) -> datetime:
    floor = period_floor(period, moment)
    return floor if floor == moment else period_after(period, floor)


def _aligned(period: str, start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """[start floored, end ceiled] to `period`, in LIMITER_TIME_ZONE."""
    try:
        first, stop = period_floor(period, start), _ceil(period, end)
        return first.astimezone(local_zone()), stop.astimezone(local_zone())
    except OverflowError:  # near datetime.min / max
        raise ValueError(gettext("start or end is out of range.")) from None


def bucket_count(period: str, start: datetime, end: datetime) -> int:
    """How many `period` buckets [start, end) spans, both aligned to `period`."""
    if period == Period.DAY:
        zone = local_zone()
        return (end.astimezone(zone).date() - start.astimezone(zone).date()).days
    step = timedelta(minutes=1) if period == Period.MINUTE else timedelta(hours=1)
    return (end - start) // step


# --- The report ---------------------------------------------------------------------------------


def _truncate(period: str, name: str) -> TruncMinute | TruncHour | TruncDay:
    # rollups._bucket for any column. The cells' period_start goes through it too, although it
    # is aligned already: both parts of the UNION then hand back the same raw representation
    # (PostgreSQL: a local timestamp without time zone; SQLite: local wall-time text), which the
    # first part's Trunc makes aware in the right zone. A bare period_start next to a Trunc
    # would be read as UTC wall time, nine hours off for days.
    if period == Period.MINUTE:
        return TruncMinute(name, tzinfo=UTC)
    if period == Period.HOUR:
        return TruncHour(name, tzinfo=UTC)
    return TruncDay(name, tzinfo=local_zone())


def usage_report(
    *,
    user_id: int | None,
    period: str,
    start: datetime,
    end: datetime,
    model: str | None = None,
    api_key_id: int | None = None,
) -> UsageReport:
    """Usage per `period` bucket over [start floored, end ceiled to the period): of one user,
    or of every user (user_id None, for operators); optionally of one model ("" = the refused
    requests) and one API key.

    Minute and hour buckets start on UTC boundaries, day buckets at midnight in
    LIMITER_TIME_ZONE (Asia/Seoul), as the roll-ups. The series is sparse: a bucket is there
    only if a request started in it (`UsageReport.filled_series` adds the empty ones). Exact as
    the module docstring says; two queries (one with an API key), whatever the number of rows.

    Raises ValueError (a translated message) for an unknown period, naive datetimes,
    end <= start, more than MAX_BUCKETS buckets, a bad id or an over-long model name.
    """
    _check_period(period)
    _check_range(start, end)
    _check_id(user_id, "user_id")
    _check_id(api_key_id, "api_key_id")
    _check_model(model)
    start, end = _aligned(period, start, end)
    if bucket_count(period, start, end) > MAX_BUCKETS:
        raise ValueError(
            gettext("That range has more than %(n)d buckets: choose a longer period.")
            % {"n": MAX_BUCKETS}
        )

    rows = UsageRecord.objects.filter(started_at__gte=start, started_at__lt=end)
    if user_id is not None:
        rows = rows.filter(user_id=user_id)
    if model is not None:
        rows = rows.filter(model=model)
    if api_key_id is not None:
        source: Source = "ledger"
        parts = _by_bucket(rows.filter(api_key_id=api_key_id), period, "started_at", _row_figures)
    else:
        source = "rollups"
        cells = UsageRollup.objects.filter(
            period=period, period_start__gte=start, period_start__lt=end
        )
        if user_id is not None:
            cells = cells.filter(user_id=user_id)
        if model is not None:
            cells = cells.filter(model=model)
        tail = rows.filter(_not_rolled_up(_watermark()))
        parts = _by_bucket(cells, period, "period_start", _cell_figures).union(
            _by_bucket(tail, period, "started_at", _row_figures), all=True
        )

    buckets: dict[datetime, _Sums] = {}
    models: dict[str, _Sums] = {}
    for bucket_start, model_name, *figures in parts:
        moment = bucket_start.astimezone(local_zone())
        buckets.setdefault(moment, _Sums()).add(figures)
        models.setdefault(model_name, _Sums()).add(figures)
    totals = _Sums()
    for sums in buckets.values():
        totals.merge(sums)
    by_model = sorted(
        ((name, UsageTotals(**sums.as_kwargs())) for name, sums in models.items()),
        key=lambda item: (-item[1].total_tokens, -item[1].requests, item[0]),
    )
    return UsageReport(
        period=period,
        start=start,
        end=end,
        user_id=user_id,
        model=model,
        api_key_id=api_key_id,
        series=[UsageBucket(start=at, **buckets[at].as_kwargs()) for at in sorted(buckets)],
        totals=UsageTotals(**totals.as_kwargs()),
        by_model=by_model,
        source=source,
        ledger_kept_since=ledger_cutoff().astimezone(local_zone()) if source == "ledger" else None,
    )


def _by_bucket(
    queryset: QuerySet[Any], period: str, column: str, figures: Any
) -> QuerySet[Any, tuple[Any, ...]]:
    """(bucket start, model, *_FIGURES) per bucket and model."""
    return (
        queryset.annotate(bucket=_truncate(period, column))
        .values("bucket", "model")
        .annotate(**figures())
        .values_list("bucket", "model", *_FIGURES)
        .order_by()
    )


# --- Top users ----------------------------------------------------------------------------------


def _tiles(start: datetime, end: datetime) -> list[tuple[str, datetime, datetime]]:
    """(period, first, stop): roll-up cells of `period` starting in [first, stop), which
    together cover [start, end) (whole minutes) exactly once, with as few cells as possible:
    whole local days, then whole hours at the edges, then minutes."""
    tiles: list[tuple[str, datetime, datetime]] = []

    def cover(low: datetime, high: datetime, periods: tuple[str, ...]) -> None:
        if low >= high:
            return
        period, *finer = periods
        if not finer:  # minutes tile any whole-minute range
            tiles.append((period, low, high))
            return
        first, stop = _ceil(period, low), period_floor(period, high)
        if first >= stop:
            cover(low, high, tuple(finer))
            return
        cover(low, first, tuple(finer))
        tiles.append((period, first, stop))
        cover(stop, high, tuple(finer))

    cover(start, end, (Period.DAY.value, Period.HOUR.value, Period.MINUTE.value))
    return tiles


_TOP_KEYS = {
    "tokens": lambda u: (-u.total_tokens, -u.requests),
    "requests": lambda u: (-u.requests, -u.total_tokens),
    "rate_limited": lambda u: (-u.rate_limited, -u.requests),
}


def top_users(
    *, start: datetime, end: datetime, by: str, limit: int = 10, model: str | None = None
) -> list[TopUser]:
    """The `limit` users with the most usage over [start floored, end ceiled to the minute),
    for operators; optionally of one model.

    by "tokens" (total tokens, then requests), "requests" (then total tokens) or
    "rate_limited" (429s, then requests); ties by user id. Users whose figure for `by` is 0
    are left out (a top list of the rate-limited holds only users who were).

    Read from roll-up cells that tile the range (whole Seoul days in the middle, hours and
    minutes at unaligned edges) plus the not rolled-up ledger rows, in one statement; exact as
    the module docstring says; usernames are joined in. Two queries whatever the number of
    users; every user with usage in the range is summed in Python, the list is cut after.
    """
    if by not in TOP_BY:
        raise ValueError(
            gettext("Unknown order %(by)s: use tokens, requests or rate_limited.") % {"by": by}
        )
    if isinstance(limit, bool) or not 1 <= limit <= MAX_TOP_USERS:
        raise ValueError(gettext("limit must be 1 to %(n)d.") % {"n": MAX_TOP_USERS})
    _check_range(start, end)
    _check_model(model)
    start, end = _aligned(Period.MINUTE, start, end)

    covered = Q(pk__in=[])
    for period, first, stop in _tiles(start, end):
        covered |= Q(period=period, period_start__gte=first, period_start__lt=stop)
    cells = UsageRollup.objects.filter(covered)
    rows = UsageRecord.objects.filter(started_at__gte=start, started_at__lt=end)
    if model is not None:
        cells = cells.filter(model=model)
        rows = rows.filter(model=model)
    tail = rows.filter(_not_rolled_up(_watermark()))
    parts = _by_user(cells, _cell_figures).union(_by_user(tail, _row_figures), all=True)

    sums: dict[int | None, _Sums] = {}
    names: dict[int | None, str | None] = {}
    for user_id, username, *figures in parts:
        sums.setdefault(user_id, _Sums()).add(figures)
        names[user_id] = username
    users = [
        TopUser(user_id=user_id, username=names[user_id], **total.as_kwargs())
        for user_id, total in sums.items()
    ]
    figure = {"tokens": "total_tokens", "requests": "requests", "rate_limited": "rate_limited"}
    users = [user for user in users if getattr(user, figure[by]) > 0]
    users.sort(key=lambda u: (*_TOP_KEYS[by](u), u.user_id is None, u.user_id or 0))
    return users[:limit]


def _by_user(queryset: QuerySet[Any], figures: Any) -> QuerySet[Any, tuple[Any, ...]]:
    """(user id, username, *_FIGURES) per user; the username by a join (a user deleted since
    has none)."""
    return (
        queryset.values("user_id", "user__username")
        .annotate(**figures())
        .values_list("user_id", "user__username", *_FIGURES)
        .order_by()
    )


# --- CSV ----------------------------------------------------------------------------------------

CSV_HEADER = (
    "period",
    "start",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
    "rate_limited",
    "errors",
)
_CSV_FIGURES = CSV_HEADER[2:]


def usage_csv_rows(report: UsageReport) -> Iterator[list[str]]:
    """The report's series as CSV rows: the header, then one row per bucket with usage.

    The header is the stable column names (as telemetry/exports.py's), not translated, so that
    scripts can rely on them; `start` is ISO 8601 in LIMITER_TIME_ZONE with its offset
    (2026-11-24T00:00:00+09:00). The caller adds the byte-order mark."""
    yield list(CSV_HEADER)
    zone = local_zone()
    for bucket in report.series:
        start = bucket.start.astimezone(zone).isoformat(timespec="seconds")
        yield [report.period, start, *(str(getattr(bucket, name)) for name in _CSV_FIGURES)]


# --- Per API key --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyUsage(UsageTotals):
    api_key_id: int | None  # None: requests without a key (never written by the gateway)
    prefix: str | None  # None if the key no longer exists


def usage_by_key(*, user_id: int, start: datetime, end: datetime) -> list[KeyUsage]:
    """A user's usage per API key over [start, end), most tokens first: one query.

    From the ledger alone (roll-ups have no key dimension), so a range older than
    LEDGER_RETENTION_DAYS is incomplete, as usage_report's key filter says."""
    _check_id(user_id, "user_id")
    _check_range(start, end)
    rows = (
        UsageRecord.objects.filter(user_id=user_id, started_at__gte=start, started_at__lt=end)
        .values("api_key_id", "api_key__prefix")
        .annotate(**_row_figures())
        .values_list("api_key_id", "api_key__prefix", *_FIGURES)
        .order_by()
    )
    keys = []
    for key_id, prefix, *figures in rows:
        sums = _Sums()
        sums.add(figures)
        keys.append(KeyUsage(api_key_id=key_id, prefix=prefix, **sums.as_kwargs()))
    keys.sort(key=lambda k: (-k.total_tokens, -k.requests, k.api_key_id or 0))
    return keys
