"""Quota alerts: which thresholds a user wants to hear about, and how (email, a webhook).

Every change goes through `set_quota_alerts`, with an acting user and an audit row. Checking
the thresholds against the live limiter and sending needs the gateway's limiter state, so it
lives above the gateway layer (telemetry/alerts.py); the periods are defined here, where both
that check and the portal read them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.utils.translation import gettext

from accounts.models import AuditAction
from accounts.services import changes, record_audit
from quotas.models import (
    AlertWindow,
    QuotaAlert,
    QuotaAlertDelivery,
    QuotaAlertSettings,
    validate_webhook_url,
)

# The thresholds the page offers as checkboxes; any other whole percentage may be typed in.
SUGGESTED_PERCENTS = (50, 80, 90, 100)
# More than this per window is noise, and bounds the rows one user can make.
MAX_THRESHOLDS_PER_WINDOW = 10
WINDOWS = tuple(AlertWindow.values)


def webhooks_enabled() -> bool:
    """Whether the operator lets users give a webhook URL (QUOTA_ALERT_WEBHOOKS, off by default:
    the server would fetch an address a user typed, see telemetry/alerts.py)."""
    return bool(settings.QUOTA_ALERT_WEBHOOKS)


# --- Periods ------------------------------------------------------------------------------------


def period_start(window: str, moment: datetime) -> datetime:
    """The start of the period `moment` falls in, in LIMITER_TIME_ZONE: the calendar day for the
    daily quota (it starts again at midnight), the clock hour for tokens per hour. The hour
    window itself slides; alerting on it at most once per clock hour keeps a user whose use
    stays high from hearing about it every check."""
    local = moment.astimezone(ZoneInfo(settings.LIMITER_TIME_ZONE))
    if window == AlertWindow.TOKENS_PER_DAY:
        return local.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == AlertWindow.TOKENS_PER_HOUR:
        return local.replace(minute=0, second=0, microsecond=0)
    raise ValueError(f"unknown alert window {window!r}")


def period_end(window: str, start: datetime) -> datetime:
    if window == AlertWindow.TOKENS_PER_DAY:
        # Wall-clock arithmetic in the zone, then normalised: a day is not always 24 hours.
        zone = start.tzinfo
        nxt = (start + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return nxt.astimezone(zone)
    return start + timedelta(hours=1)


def crossed(used: int, limit: int, threshold_percent: int) -> bool:
    """Whether `used` has reached `threshold_percent` of `limit` (integers: no rounding at the
    edge; a window without a limit never crosses)."""
    return limit > 0 and used * 100 >= threshold_percent * limit


# --- Reading ------------------------------------------------------------------------------------


def alert_settings(user: User) -> QuotaAlertSettings:
    """The user's settings, or the defaults (unsaved) if they never changed them: one query."""
    found = QuotaAlertSettings.objects.filter(user=user).first()
    return found if found is not None else QuotaAlertSettings(user=user)


def enabled_alerts(user: User) -> list[QuotaAlert]:
    return list(
        QuotaAlert.objects.filter(user=user, enabled=True).order_by("window", "threshold_percent")
    )


def recent_deliveries(user: User, limit: int = 20) -> QuerySet[QuotaAlertDelivery]:
    return (
        QuotaAlertDelivery.objects.filter(alert__user=user)
        .select_related("alert")
        .order_by("-created_at", "-pk")[:limit]
    )


# --- Validation ---------------------------------------------------------------------------------

_SEPARATORS = re.compile(r"[\s,]+")


def parse_percentages(text: str) -> list[int]:
    """Whole percentages typed by a person ("75, 95%" → [75, 95]); ValidationError in words."""
    values = []
    for part in _SEPARATORS.split(text.strip()):
        if not part:
            continue
        number = part.removesuffix("%")
        if not number.isascii() or not number.isdigit():
            raise ValidationError(
                gettext(
                    "“%(value)s” is not a whole percentage: enter numbers from 1 to 100, "
                    "separated by commas."
                )
                % {"value": part[:20]}
            )
        values.append(int(number))
    return values


def check_thresholds(values: object) -> list[int]:
    """Sorted distinct whole percentages from 1 to 100, at most MAX_THRESHOLDS_PER_WINDOW."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValidationError(gettext("Enter a list of percentages."))
    cleaned: set[int] = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(gettext("Enter whole percentages from 1 to 100."))
        if not 1 <= value <= 100:
            raise ValidationError(
                gettext("%(value)d%% is not between 1%% and 100%%.") % {"value": value}
            )
        cleaned.add(value)
    if len(cleaned) > MAX_THRESHOLDS_PER_WINDOW:
        raise ValidationError(
            gettext("Choose at most %(max)d thresholds per limit.")
            % {"max": MAX_THRESHOLDS_PER_WINDOW}
        )
    return sorted(cleaned)


def check_webhook_url(url: object) -> str:
    if not isinstance(url, str):
        raise ValidationError(gettext("Enter a text."))
    url = url.strip()
    if url and not webhooks_enabled():
        raise ValidationError(gettext("Webhooks are turned off on this server."))
    validate_webhook_url(url)
    return url


def shown_url(url: str) -> str:
    """A webhook as the audit log keeps it: scheme and host only. The path of a chat webhook
    (Slack, Teams, …) is its secret, and the audit log is read by every operator."""
    if not url:
        return ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…"


# --- Changing -----------------------------------------------------------------------------------


def set_quota_alerts(
    user: User,
    *,
    actor: User | None,
    actor_label: str | None = None,
    thresholds: Mapping[str, Iterable[int]] | None = None,
    email_enabled: bool | None = None,
    webhook_url: str | None = None,
) -> bool:
    """Set the user's thresholds (per window: exactly these are on, the others off) and how
    they are told; what is not given (None, or a window not in `thresholds`) stays as it is.
    Validated first (ValidationError by field: the window's name, "email_enabled",
    "webhook_url"); returns whether anything changed, and only then writes one audit row."""
    errors: dict[str, Any] = {}
    wanted: dict[str, list[int]] = {}
    for window, values in (thresholds or {}).items():
        if window not in WINDOWS:
            raise ValueError(f"unknown alert window {window!r}")
        try:
            wanted[window] = check_thresholds(values)
        except ValidationError as exc:
            errors[window] = exc.error_list
    if email_enabled is not None and not isinstance(email_enabled, bool):
        errors["email_enabled"] = [ValidationError(gettext("Choose on or off."))]
    if webhook_url is not None:
        try:
            webhook_url = check_webhook_url(webhook_url)
        except ValidationError as exc:
            errors["webhook_url"] = exc.error_list
    if errors:
        raise ValidationError(errors)

    with transaction.atomic():
        # The user's row locked: two saves of the page at once apply one after the other, so
        # neither's audit "old" values are stale and no unique insert collides.
        User.objects.select_for_update().filter(pk=user.pk).first()
        rows = {
            (alert.window, alert.threshold_percent): alert
            for alert in QuotaAlert.objects.filter(user=user, window__in=list(wanted))
        }
        before = {
            window: sorted(t for (w, t), a in rows.items() if w == window and a.enabled)
            for window in wanted
        }
        details = changes(before, wanted)
        for window, values in wanted.items():
            _apply_window(user, window, values, rows)
        details.update(_apply_settings(user, email_enabled, webhook_url))
        if details:
            record_audit(actor, AuditAction.QUOTA_ALERTS_CHANGED, user, details, actor_label)
    return bool(details)


def _apply_window(
    user: User, window: str, values: list[int], rows: dict[tuple[str, int], QuotaAlert]
) -> None:
    on = set(values)
    existing = {t for (w, t) in rows if w == window}
    QuotaAlert.objects.bulk_create(
        QuotaAlert(user=user, window=window, threshold_percent=t) for t in sorted(on - existing)
    )
    turn_on = [a.pk for (w, t), a in rows.items() if w == window and t in on and not a.enabled]
    turn_off = [a.pk for (w, t), a in rows.items() if w == window and t not in on and a.enabled]
    if turn_on:
        QuotaAlert.objects.filter(pk__in=turn_on).update(enabled=True)
    if turn_off:
        QuotaAlert.objects.filter(pk__in=turn_off).update(enabled=False)


def _apply_settings(
    user: User, email_enabled: bool | None, webhook_url: str | None
) -> dict[str, dict[str, Any]]:
    if email_enabled is None and webhook_url is None:
        return {}
    current = QuotaAlertSettings.objects.filter(user=user).first()
    row = current if current is not None else QuotaAlertSettings(user=user)
    old_email, old_url = row.email_enabled, row.webhook_url
    new_email = old_email if email_enabled is None else email_enabled
    new_url = old_url if webhook_url is None else webhook_url
    if (new_email, new_url) == (old_email, old_url):
        return {}
    row.email_enabled = new_email
    row.webhook_url = new_url
    row.save()
    details = changes({"email_enabled": old_email}, {"email_enabled": new_email})
    if new_url != old_url:
        # Recorded even when only the (secret) path changed and both look alike here.
        details["webhook_url"] = {"old": shown_url(old_url), "new": shown_url(new_url)}
    return details
