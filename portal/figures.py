"""What the portal shows, computed from the services' results: live windows as rows with a
level and a reset in words, refusals in words, chart series. No queries here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone
from django.utils.formats import date_format
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from telemetry.rollups import local_zone
from telemetry.usage import UsageBucket
from tokenlimit.limiter import (
    COOLDOWN,
    PARALLEL,
    REQUESTS,
    TOKENS,
    TOKENS_DAY,
    TOKENS_HOUR,
    TOO_LARGE,
)

# A window at or above this share of its limit is shown as a warning; at 100 % as exhausted.
WARN_PERCENT = 80

WINDOW_LABELS = {
    "requests_per_minute": gettext_lazy("Requests per minute (RPM)"),
    "tokens_per_minute": gettext_lazy("Tokens per minute (TPM)"),
    "tokens_per_hour": gettext_lazy("Tokens per hour (TPH)"),
    "tokens_per_day": gettext_lazy("Tokens per day"),
}


@dataclass(frozen=True, slots=True)
class WindowRow:
    window: str
    label: str
    limit: int  # 0: no limit
    used: int
    remaining: int
    percent: float  # of the limit, 0 without one; may exceed 100 (a settled overrun)
    level: str  # "ok" | "warn" | "bad" | "idle" (no limit)
    resets_at: datetime
    reset_words: str


def window_rows(scope: dict[str, Any]) -> list[WindowRow]:
    """One row per window of a /api/v1/me scope (api/me.py), in the order RPM, TPM, TPH, day."""
    rows = []
    for window in scope["windows"]:
        limit, used = int(window["limit"]), int(window["used"])
        percent = min(used / limit * 100, 999.0) if limit else 0.0
        rows.append(
            WindowRow(
                window=window["window"],
                label=str(WINDOW_LABELS[window["window"]]),
                limit=limit,
                used=used,
                remaining=int(window["remaining"]),
                percent=round(percent, 1),
                level=level(percent) if limit else "idle",
                resets_at=window["resets_at"],
                reset_words=reset_words(window["window"], window["resets_at"], used),
            )
        )
    return rows


def level(percent: float) -> str:
    if percent >= 100:
        return "bad"
    return "warn" if percent >= WARN_PERCENT else "ok"


def reset_words(window: str, resets_at: datetime, used: int) -> str:
    """When the window gives room again, in words and in local time (Asia/Seoul)."""
    if window == "tokens_per_day":
        # Always the next midnight, used or not (an empty window reports "now" as its reset).
        return _("Resets at midnight (KST): %(moment)s") % {
            "moment": date_format(next_midnight(timezone.now()), "Y-m-d H:i")
        }
    if not used:
        return _("Nothing used in the last %(span)s.") % {"span": _span(window)}
    # Rolling windows: what was used leaves the window one minute (or hour) after it started.
    return _("Rolling %(span)s: room again from %(time)s") % {
        "span": _span(window),
        "time": date_format(timezone.localtime(resets_at), "TIME_FORMAT"),
    }


def next_midnight(now: datetime) -> datetime:
    """The next midnight in LIMITER_TIME_ZONE, when the daily token quota starts again."""
    local = timezone.localtime(now, local_zone())
    return (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)


def _span(window: str) -> str:
    return _("hour") if window == "tokens_per_hour" else _("minute")


def refusal_words(kind: str, started_at: datetime, cooldown_minutes: int) -> tuple[str, str]:
    """(which limit refused, when to retry) for a 429 row of the ledger, in words."""
    local = timezone.localtime(started_at)
    if kind == TOKENS_DAY:
        return _("Daily token quota used up"), _("From midnight (KST), %(moment)s") % {
            "moment": date_format(next_midnight(started_at), "Y-m-d H:i")
        }
    if kind == TOKENS_HOUR:
        return _("Tokens per hour"), _("Within the hour, by %(time)s at the latest") % {
            "time": date_format(local + timedelta(hours=1), "TIME_FORMAT")
        }
    if kind in (REQUESTS, TOKENS):
        label = _("Requests per minute") if kind == REQUESTS else _("Tokens per minute")
        return label, _("Within a minute, by %(time)s at the latest") % {
            "time": date_format(local + timedelta(minutes=1), "TIME_FORMAT")
        }
    if kind == PARALLEL:
        return _("Too many requests at once"), _("As soon as one of your running requests ends")
    if kind == COOLDOWN:
        return _("Cooldown after exceeding a limit"), _("After the cooldown, at %(time)s") % {
            "time": date_format(local + timedelta(minutes=cooldown_minutes), "TIME_FORMAT")
        }
    if kind == TOO_LARGE:
        return _("Request larger than a whole window"), _(
            "Not as it is: lower max_tokens or shorten the input"
        )
    return _("A limit"), _("Later")


def chart_series(buckets: list[UsageBucket], label_format: str) -> dict[str, list[Any]]:
    """A filled series as Chart.js wants it: labels and one list per figure."""
    return {
        "labels": [date_format(timezone.localtime(b.start), label_format) for b in buckets],
        "prompt": [b.prompt_tokens for b in buckets],
        "completion": [b.completion_tokens for b in buckets],
        "requests": [b.requests for b in buckets],
        "rate_limited": [b.rate_limited for b in buckets],
    }
