"""The operator console's figures over a range (today, 7 or 30 days, from Seoul midnight):
top users, API keys and models, errors by type, 429s by limit, the ledger's backlog and dead
letters, and the prompt-count reconciliation per model.

A constant number of queries whatever the number of users, keys or models (eight; see
`console_figures`). Users and models come from the roll-ups plus the not rolled-up tail
(telemetry.usage, exact); keys, errors and the reconciliation from the ledger, which keeps
LEDGER_RETENTION_DAYS (at least the 30 days of the longest range).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, F, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from gateway.models import ServedModel
from gateway.services import with_prompt_reconciliation
from quotas.models import LedgerDeadLetter, UsageRecord
from telemetry.rollups import local_zone
from telemetry.usage import TOP_BY, TopUser, UsageTotals, top_users, usage_report

log = logging.getLogger(__name__)

RANGES: dict[str, int] = {"today": 1, "7d": 7, "30d": 30}  # days, today included
DEFAULT_RANGE = "today"
DEFAULT_BY = "tokens"
TOP_N = 10


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyRow(UsageTotals):
    api_key_id: int | None
    prefix: str | None  # None: the key was deleted
    name: str
    user_id: int | None
    username: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class Reconciliation:
    model: str
    checked: int  # upstream-billed 200s in the range
    differing: int  # of those, where the gateway's prompt count was not the upstream's
    mean_gap: float  # tokens, over the differing ones

    @property
    def share_differing(self) -> float:
        return 100.0 * self.differing / self.checked if self.checked else 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsoleFigures:
    range: str
    by: str
    start: datetime  # Seoul midnight
    end: datetime  # now
    totals: UsageTotals
    users: list[TopUser]
    keys: list[KeyRow]
    models: list[tuple[str, UsageTotals]]
    errors: list[tuple[str, int]]  # (error type, count), most first
    refusals: list[tuple[str, int]]  # 429s by limit, most first
    backlog: int | None  # usage events waiting in the Redis stream; None: no stream / unknown
    dead_letters: int  # not yet replayed
    reconciliation: list[Reconciliation]


def range_bounds(name: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """[Seoul midnight `RANGES[name]` - 1 days ago, now)."""
    now = now or timezone.now()
    today = timezone.localtime(now, local_zone()).replace(hour=0, minute=0, second=0, microsecond=0)
    # Day arithmetic on the wall clock: a Seoul day is always 24 h (no DST), but stay honest.
    start = (today - timedelta(days=RANGES[name] - 1)).replace(tzinfo=None)
    return timezone.make_aware(start, local_zone()), now


_SORT = {
    "tokens": lambda t: (-t.total_tokens, -t.requests),
    "requests": lambda t: (-t.requests, -t.total_tokens),
    "rate_limited": lambda t: (-t.rate_limited, -t.requests),
}
_FIGURE = {"tokens": "total_tokens", "requests": "requests", "rate_limited": "rate_limited"}


def console_figures(range_name: str, by: str, *, now: datetime | None = None) -> ConsoleFigures:
    """Everything the console's range tabs show. Eight queries: top users 2, models and totals 2,
    keys 1, errors and 429s 1, dead letters 1, reconciliation 1 (and no ORM for the backlog,
    which is one Redis call)."""
    if range_name not in RANGES:
        range_name = DEFAULT_RANGE
    if by not in TOP_BY:
        by = DEFAULT_BY
    start, end = range_bounds(range_name, now)
    report = usage_report(user_id=None, period="day", start=start, end=end)
    models = [(name, t) for name, t in report.by_model if getattr(t, _FIGURE[by]) > 0]
    models.sort(key=lambda item: (*_SORT[by](item[1]), item[0]))
    errors, refusals = _errors(start, end)
    return ConsoleFigures(
        range=range_name,
        by=by,
        start=start,
        end=end,
        totals=report.totals,
        users=top_users(start=start, end=end, by=by, limit=TOP_N),
        keys=_top_keys(start, end, by),
        models=models[:TOP_N],
        errors=errors,
        refusals=refusals,
        backlog=ledger_backlog(),
        dead_letters=LedgerDeadLetter.objects.filter(replayed_at__isnull=True).count(),
        reconciliation=_reconciliation(start, end),
    )


def _top_keys(start: datetime, end: datetime, by: str) -> list[KeyRow]:
    """The TOP_N keys by `by` over [start, end), from the ledger: one query."""
    order = {
        "tokens": ("-total", "-n"),
        "requests": ("-n", "-total"),
        "rate_limited": ("-limited", "-n"),
    }[by]
    figure = {"tokens": "total", "requests": "n", "rate_limited": "limited"}[by]
    rows = (
        UsageRecord.objects.filter(started_at__gte=start, started_at__lt=end)
        .values("api_key_id", "api_key__prefix", "api_key__name", "user_id", "user__username")
        .annotate(
            n=Count("pk"),
            prompt=Coalesce(Sum("prompt_tokens"), 0),
            completion=Coalesce(Sum("completion_tokens"), 0),
            cached=Coalesce(Sum("cached_tokens"), 0),
            total=Coalesce(Sum(F("prompt_tokens") + F("completion_tokens")), 0),
            limited=Count("pk", filter=Q(status_code=429)),
            failed=Count("pk", filter=Q(status_code__gte=400) & ~Q(status_code=429)),
        )
        .filter(**{f"{figure}__gt": 0})
        .order_by(*order, "api_key_id")[:TOP_N]
    )
    return [
        KeyRow(
            api_key_id=row["api_key_id"],
            prefix=row["api_key__prefix"],
            name=row["api_key__name"] or "",
            user_id=row["user_id"],
            username=row["user__username"],
            requests=row["n"],
            prompt_tokens=int(row["prompt"]),
            completion_tokens=int(row["completion"]),
            cached_tokens=int(row["cached"]),
            rate_limited=row["limited"],
            errors=row["failed"],
        )
        for row in rows
    ]


def _errors(start: datetime, end: datetime) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(errors by type, 429s by limit) over [start, end), from the ledger: one query."""
    rows = (
        UsageRecord.objects.filter(started_at__gte=start, started_at__lt=end, status_code__gte=400)
        .values("status_code", "error_type")
        .annotate(n=Count("pk"))
        .order_by()
    )
    errors: dict[str, int] = {}
    refusals: dict[str, int] = {}
    for row in rows:
        into = refusals if row["status_code"] == 429 else errors
        into[row["error_type"]] = into.get(row["error_type"], 0) + row["n"]

    def ranked(counts: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    return ranked(errors), ranked(refusals)


def _reconciliation(start: datetime, end: datetime) -> list[Reconciliation]:
    """The admin's "prompt counts vs upstream" column (gateway/admin.py ServedModelAdmin) over
    the range: per served model, upstream-billed 200s, how many of them the gateway counted
    differently, and the mean gap. One query (a subquery per column)."""
    models = ServedModel.objects.order_by("name").only("name")
    return [
        Reconciliation(
            model=row.name,
            checked=getattr(row, "checked", None) or 0,
            differing=getattr(row, "differing", None) or 0,
            mean_gap=getattr(row, "mean_gap", None) or 0.0,
        )
        for row in with_prompt_reconciliation(models, start, end)
    ]


def ledger_backlog() -> int | None:
    """Usage events in the Redis stream not yet written to the database (gateway/health.py's
    `ledger_stream_backlog`); None in the embedded mode (no REDIS_URL: the gateway writes
    the database itself) or when Redis does not answer."""
    if not settings.REDIS_URL:
        return None
    import redis

    from quotas import ledger_stream

    try:
        # A short timeout: a page must not hang on a Redis that does not answer.
        connection = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            return ledger_stream.backlog(connection)
        finally:
            connection.close()
    except Exception:
        log.warning("could not read the ledger stream's backlog", exc_info=True)
        return None


def admin_filter(**lookups: Any) -> str:
    """The query string of an admin changelist filtered by `lookups` (values made text)."""
    from urllib.parse import urlencode

    return "?" + urlencode({key: _text(value) for key, value in lookups.items()})


def _text(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(local_zone()).isoformat(sep=" ", timespec="seconds")
    return str(value)
