"""The end user's pages about usage: "내 사용량" (live windows, today, this month, charts, per
model and per key, CSV), "요청 기록" (the ledger rows) and "한도 안내" (the limits explained
with the user's own numbers). Thin: the numbers come from api.me (the limiter, as /api/v1/me),
telemetry.usage (the roll-ups, as /api/v1/usage) and the ledger."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from api.client_views import csv_response
from api.me import me_payload
from portal.figures import chart_series, next_midnight, refusal_words, window_rows
from quotas.models import UsageRecord
from quotas.services import effective_limits_for, user_plan
from telemetry.rollups import local_zone
from telemetry.usage import UsageTotals, usage_by_key, usage_csv_rows, usage_report
from tokenlimit.limiter import LimiterUnavailable

CHART_DAYS = 30  # the daily chart, the per-model and per-key tables
CHART_HOURS = 24
CSV_SPANS = {"day": timedelta(days=90), "hour": timedelta(days=7)}
REQUESTS_PER_PAGE = 50
STATUS_FILTERS = ("ok", "error", "rate_limited")


def _user(request: HttpRequest) -> User:
    return cast(User, request.user)


@require_GET
@login_required
def usage(request: HttpRequest) -> HttpResponse:
    user = _user(request)
    now = timezone.now()
    local_now = timezone.localtime(now, local_zone())
    today = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = today.replace(day=1)
    # One day-by-day report covers the daily chart, today and this month (2 queries).
    first_day = min(today - timedelta(days=CHART_DAYS - 1), month)
    daily = usage_report(user_id=user.pk, period="day", start=first_day, end=now)
    hourly = usage_report(
        user_id=user.pk, period="hour", start=now - timedelta(hours=CHART_HOURS - 1), end=now
    )
    days = daily.filled_series()
    try:
        live: dict[str, Any] | None = me_payload(user, None)
    except LimiterUnavailable:
        live = None
    context = {
        "live": live,
        "windows": window_rows(live["scopes"][0]) if live else [],
        "key_windows": [(scope, window_rows(scope)) for scope in live["scopes"][1:]]
        if live
        else [],
        "plan": live["plan"]["name"] if live else user_plan(user).name,
        "today": _sum(b for b in days if b.start >= today),
        "month": _sum(b for b in days if b.start >= month),
        "month_start": month,
        "by_model": daily.by_model,
        "by_key": usage_by_key(user_id=user.pk, start=first_day, end=now),
        "first_day": first_day,
        "charts": {
            "daily": chart_series(days, "n/j"),
            "hourly": chart_series(hourly.filled_series(), "H:i"),
        },
    }
    return render(request, "portal/usage.html", context)


def _sum(buckets: Any) -> UsageTotals:
    figures = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    figures |= {"rate_limited": 0, "errors": 0}
    for bucket in buckets:
        for name in figures:
            figures[name] += getattr(bucket, name)
    return UsageTotals(**figures)


@require_GET
@login_required
def usage_csv(request: HttpRequest) -> HttpResponse:
    """The user's usage by day (the last 90 days) or by hour (the last 7), as the API's CSV."""
    period = request.GET.get("period", "day")
    if period not in CSV_SPANS:
        period = "day"
    now = timezone.now()
    report = usage_report(
        user_id=_user(request).pk, period=period, start=now - CSV_SPANS[period], end=now
    )
    return csv_response(usage_csv_rows(report), f"usage-{period}.csv")


@require_GET
@login_required
def request_history(request: HttpRequest) -> HttpResponse:
    """The user's own ledger rows, newest first, a page at a time (?before=<id>)."""
    user = _user(request)
    status = request.GET.get("status", "")
    rows = UsageRecord.objects.filter(user_id=user.pk).select_related("api_key")
    if status == "ok":
        rows = rows.filter(status_code__lt=400)
    elif status == "error":
        rows = rows.filter(status_code__gte=400).exclude(status_code=429)
    elif status == "rate_limited":
        rows = rows.filter(status_code=429)
    else:
        status = ""
    before = _positive_int(request.GET.get("before"))
    if before is not None:
        rows = rows.filter(pk__lt=before)
    page = list(rows.order_by("-pk")[: REQUESTS_PER_PAGE + 1])
    more = len(page) > REQUESTS_PER_PAGE
    page = page[:REQUESTS_PER_PAGE]
    cooldown = effective_limits_for(user).cooldown_minutes if page else 0
    context = {
        "rows": [_request_row(row, cooldown) for row in page],
        "status": status,
        "statuses": STATUS_FILTERS,
        "next_before": page[-1].pk if more else None,
        "first_page": before is None,
    }
    return render(request, "portal/requests.html", context)


def _positive_int(text: str | None) -> int | None:
    if text is None or not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if 0 < value < 2**63 else None


def _request_row(row: UsageRecord, cooldown_minutes: int) -> dict[str, Any]:
    refused = row.status_code == 429
    limit, retry = ("", "")
    if refused:
        limit, retry = refusal_words(row.error_type, row.started_at, cooldown_minutes)
    if row.status_code < 400:
        state = "ok"
    elif refused:
        state = "rate_limited"
    else:
        state = "error"
    return {
        "row": row,
        "state": state,
        "key_prefix": row.api_key.prefix if row.api_key_id and row.api_key else "",
        "latency_ms": (row.finished_at - row.started_at).total_seconds() * 1000,
        "refused_by": limit,
        "retry": retry,
    }


@require_GET
@login_required
def limits_guide(request: HttpRequest) -> HttpResponse:
    """Every limit explained, with the user's own numbers."""
    user = _user(request)
    limits = effective_limits_for(user)
    context = {
        "plan": user_plan(user),
        "limits": limits,
        "time_zone": settings.LIMITER_TIME_ZONE,
        "next_midnight": next_midnight(timezone.now()),
    }
    return render(request, "portal/limits.html", context)
