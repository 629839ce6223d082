"""The quota alert check: compare every alert with the live limiter and tell the user, once per
threshold per period (quotas/alerts.py defines alerts and periods).

Run by the beat every QUOTA_ALERT_CHECK_SECONDS (telemetry.tasks.check_quota_alerts; in the
single-process quick start by the gateway's embedded beat, which reads the same in-memory
limiter the gateway admits with). It lives above the gateway layer because the numbers are the
limiter's own (gateway.limits.read_live_state, as /api/v1/me and the x-ratelimit-* headers):
running requests count at what they reserved, so a burst of long requests can cross a
threshold a few seconds before their settlement brings the count back under it.

Once per period: a delivery row is inserted before anything is sent, and (alert, period) is
unique, so of two checks racing (two workers, a slow run overlapping the next) only the one
whose insert went in sends.

Never retried: a delivery that failed (mail server down, webhook answering 500) is recorded
as failed with its error, which the user sees on the alerts page, and the next threshold or
the next period is sent as usual. A retry could repeat a notification that did arrive (a
webhook that timed out after acting on it), and "80 % of today's tokens used", late, is noise.
A check that dies between the insert and the send leaves the delivery "sending" forever: at
most once, never twice.

Queries: per batch of BATCH_USERS users with alerts, one for the users (with quota, plan and
settings), one for their alerts, and, only when something was crossed, one for the deliveries
already made, one insert per chunk of new ones and one update of their outcome; the default
plan once per run. The limiter is read once per user (a user's counters share a Redis Cluster
hash slot; several users' do not, so they are not read together).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from django.conf import settings
from django.contrib.auth.models import User
from django.core.mail import EmailMessage, get_connection
from django.core.mail.backends.base import BaseEmailBackend
from django.db import connection
from django.db.models import Exists, OuterRef
from django.urls import NoReverseMatch, reverse
from django.utils import timezone, translation
from django.utils.formats import date_format
from django.utils.translation import gettext as _

from gateway.limits import read_live_state, user_scopes
from quotas.alerts import crossed, period_end, period_start, webhooks_enabled
from quotas.models import (
    DELIVERY_ERROR_MAX,
    AlertWindow,
    DeliveryStatus,
    QuotaAlert,
    QuotaAlertDelivery,
    QuotaAlertSettings,
    UserQuota,
)
from quotas.services import default_plan, plan_limits
from tokenlimit.limiter import LimiterUnavailable, Limits, ScopeReading

log = logging.getLogger(__name__)

BATCH_USERS = 200
WEBHOOK_TIMEOUT_SECONDS = 5.0
EMAIL = "email"
WEBHOOK = "webhook"
USER_AGENT = "korean-sglang-token-limiter/quota-alerts"

# ScopeReading's count for each alert window.
USED = {
    AlertWindow.TOKENS_PER_DAY: "used_tokens_day",
    AlertWindow.TOKENS_PER_HOUR: "used_tokens_hour",
}


@dataclass
class CheckResult:
    users: int = 0  # users with at least one alert on, checked
    crossed: int = 0  # thresholds newly crossed this run (deliveries made)
    sent: int = 0  # notifications (one per user and window) sent on every channel tried
    failed: int = 0  # notifications with a channel that failed
    no_channel: int = 0  # thresholds crossed by users with neither email nor webhook
    limiter_unavailable: bool = False


@dataclass
class Notice:
    """One message to one user about one window: the highest threshold just crossed (several
    crossed at once make one message, not one each)."""

    user: User
    window: str
    used: int
    limit: int
    period_start: datetime
    resets_at: datetime
    channels: list[str]
    webhook_url: str
    deliveries: list[QuotaAlertDelivery] = field(default_factory=list)
    thresholds: list[int] = field(default_factory=list)


def check_quota_alerts(*, now: float | None = None) -> CheckResult:
    """Check every active user's alerts against the live limiter; send what was crossed."""
    at = time.time() if now is None else now
    moment = datetime.fromtimestamp(at, UTC)
    result = CheckResult()
    senders = Senders()
    default_limits: list[Limits] = []  # the default plan's, loaded when first needed
    after = 0
    try:
        while True:
            users = _candidates(after)
            if not users:
                break
            after = users[-1].pk
            _check_batch(users, at, moment, default_limits, senders, result)
            if len(users) < BATCH_USERS:
                break
    except LimiterUnavailable as exc:
        # Nothing was recorded for the users not read: the next run checks them.
        log.error("quota alerts: limiter unavailable, check stopped: %s", exc)
        result.limiter_unavailable = True
    finally:
        senders.close()
    return result


def _candidates(after: int) -> list[User]:
    has_alert = QuotaAlert.objects.filter(user=OuterRef("pk"), enabled=True)
    return list(
        User.objects.filter(Exists(has_alert), is_active=True, pk__gt=after)
        .select_related("quota__plan", "quota_alert_settings")
        .order_by("pk")[:BATCH_USERS]
    )


def _limits(user: User, default_limits: list[Limits]) -> Limits:
    # Not quotas.services.effective_limits_for: it asks for the default plan once per user.
    quota: UserQuota | None = getattr(user, "quota", None)
    if quota is not None:
        return quota.effective_limits()
    if not default_limits:
        default_limits.append(plan_limits(default_plan()))
    return default_limits[0]


def _check_batch(
    users: list[User],
    at: float,
    moment: datetime,
    default_limits: list[Limits],
    senders: Senders,
    result: CheckResult,
) -> None:
    result.users += len(users)
    by_user: dict[int, list[QuotaAlert]] = defaultdict(list)
    for alert in QuotaAlert.objects.filter(user__in=users, enabled=True).order_by("pk"):
        by_user[alert.user_id].append(alert)
    candidates: list[tuple[QuotaAlert, Notice]] = []
    for user in users:
        limits = _limits(user, default_limits)
        reading = read_live_state(user_scopes(user.pk, limits), now=at)[0]
        notices: dict[str, Notice] = {}
        for alert in by_user.get(user.pk, []):
            limit = int(getattr(limits, alert.window))
            used = int(getattr(reading, USED[AlertWindow(alert.window)]))
            if not crossed(used, limit, alert.threshold_percent):
                continue
            notice = notices.get(alert.window)
            if notice is None:
                channels, url = _channels(user)
                if not channels:
                    result.no_channel += 1
                    continue
                start = period_start(alert.window, moment)
                notice = notices[alert.window] = Notice(
                    user=user,
                    window=alert.window,
                    used=used,
                    limit=limit,
                    period_start=start,
                    resets_at=_resets_at(alert.window, start, moment, reading),
                    channels=channels,
                    webhook_url=url,
                )
            candidates.append((alert, notice))
    if not candidates:
        return
    claimed = _claim(_not_yet_delivered(candidates), moment)
    result.crossed += len(claimed)
    notices_sent = {id(notice): notice for _, notice in claimed}
    for delivery, notice in claimed:
        notice.deliveries.append(delivery)
        notice.thresholds.append(delivery.alert.threshold_percent)
    for notice in notices_sent.values():
        _deliver(notice, senders)
        if all(d.status == DeliveryStatus.SENT for d in notice.deliveries):
            result.sent += 1
        else:
            result.failed += 1
    deliveries = [delivery for delivery, _ in claimed]
    if deliveries:
        QuotaAlertDelivery.objects.bulk_update(deliveries, ["status", "sent_at", "error"])


def _channels(user: User) -> tuple[list[str], str]:
    own: QuotaAlertSettings | None = getattr(user, "quota_alert_settings", None)
    email_on = own.email_enabled if own is not None else True
    url = own.webhook_url if own is not None else ""
    channels = []
    if email_on and user.email:
        channels.append(EMAIL)
    if url and webhooks_enabled():
        channels.append(WEBHOOK)
    return channels, url


def _resets_at(window: str, start: datetime, moment: datetime, reading: ScopeReading) -> datetime:
    """When the window gives room again: midnight for the day; for the sliding hour, when the
    oldest tokens in it leave (as x-ratelimit-reset-tokens-hour says)."""
    if window == AlertWindow.TOKENS_PER_DAY:
        return period_end(window, start)
    return moment + timedelta(seconds=float(reading.state.reset_tokens_hour))


def _not_yet_delivered(
    candidates: list[tuple[QuotaAlert, Notice]],
) -> list[tuple[QuotaAlert, Notice]]:
    """Leave out the alerts already delivered this period (the usual case: a threshold stays
    crossed for the rest of the day), so that the insert only races for new ones."""
    periods = {notice.period_start for _, notice in candidates}
    done = set(
        QuotaAlertDelivery.objects.filter(
            alert_id__in=[alert.pk for alert, _ in candidates], period_start__in=periods
        ).values_list("alert_id", "period_start")
    )
    return [(a, n) for a, n in candidates if (a.pk, n.period_start) not in done]


# Every column without a database default (Django keeps defaults in Python).
CLAIM_COLUMNS = (
    "alert_id",
    "period_start",
    "created_at",
    "channel",
    "status",
    "used",
    "limit",
    "error",
)


def _claim(
    candidates: list[tuple[QuotaAlert, Notice]], moment: datetime
) -> list[tuple[QuotaAlertDelivery, Notice]]:
    """Insert a pending delivery for each candidate; returns the ones this check inserted (a
    delivery another check made first is skipped by the unique constraint, atomically, and
    not returned). Each insert commits at once (autocommit), so a racing check sees it."""
    if not candidates:
        return []
    table = connection.ops.quote_name(QuotaAlertDelivery._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(c) for c in CLAIM_COLUMNS)
    conflict = ", ".join(connection.ops.quote_name(c) for c in ("alert_id", "period_start"))
    adapt = connection.ops.adapt_datetimefield_value
    won: dict[int, int] = {}  # alert id → delivery id
    chunk = max(1, (connection.features.max_query_params or 30000) // len(CLAIM_COLUMNS))
    for first in range(0, len(candidates), chunk):
        part = candidates[first : first + chunk]
        rows = ", ".join(["(" + ", ".join(["%s"] * len(CLAIM_COLUMNS)) + ")"] * len(part))
        params: list[Any] = []
        for alert, notice in part:
            params += [alert.pk, adapt(notice.period_start), adapt(moment)]
            params += ["+".join(notice.channels), DeliveryStatus.PENDING, notice.used]
            params += [notice.limit, ""]
        sql = (
            f"INSERT INTO {table} ({columns}) VALUES {rows} "
            f"ON CONFLICT ({conflict}) DO NOTHING RETURNING id, alert_id"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            won.update((alert_id, pk) for pk, alert_id in cursor.fetchall())
    claimed = []
    for alert, notice in candidates:
        if alert.pk in won:
            delivery = QuotaAlertDelivery(
                pk=won[alert.pk],
                alert=alert,
                period_start=notice.period_start,
                created_at=moment,
                channel="+".join(notice.channels),
                used=notice.used,
                limit=notice.limit,
            )
            claimed.append((delivery, notice))
    return claimed


# --- Sending ------------------------------------------------------------------------------------


class Senders:
    """One mail connection and one HTTP client for a whole run, opened when first needed."""

    def __init__(self) -> None:
        self._mail: BaseEmailBackend | None = None
        self._mail_broken: str | None = None
        self._http: httpx.Client | None = None

    def email(self, message: EmailMessage) -> None:
        if self._mail_broken is not None:
            # The server could not be reached this run: fail fast rather than wait for its
            # timeout once per user.
            raise DeliveryError(self._mail_broken)
        if self._mail is None:
            self._mail = get_connection(fail_silently=False)
            try:
                self._mail.open()
            except Exception as exc:
                self._mail_broken = _describe(exc)
                raise DeliveryError(self._mail_broken) from exc
        self._mail.send_messages([message])

    def webhook(self, url: str, payload: dict[str, Any]) -> None:
        if self._http is None:
            # No redirects: a redirect would send the request on to an address nobody checked.
            self._http = httpx.Client(
                timeout=WEBHOOK_TIMEOUT_SECONDS,
                follow_redirects=False,
                headers={"user-agent": USER_AGENT},
            )
        response = self._http.post(url, json=payload)
        if not 200 <= response.status_code < 300:
            raise DeliveryError(f"HTTP {response.status_code} {response.reason_phrase}".strip())

    def close(self) -> None:
        if self._mail is not None:
            try:
                self._mail.close()
            except Exception:  # closing a broken SMTP session may fail again; nothing to keep
                log.debug("quota alerts: closing the mail connection failed", exc_info=True)
        if self._http is not None:
            self._http.close()


class DeliveryError(Exception):
    pass


def _deliver(notice: Notice, senders: Senders) -> None:
    """Send `notice` on each of its channels; a failure is recorded, never raised, so that one
    user's broken webhook does not keep the others' messages."""
    with translation.override(settings.LANGUAGE_CODE):
        subject, body, payload = _content(notice)
    errors = []
    delivered = False
    for channel in notice.channels:
        try:
            if channel == EMAIL:
                message = EmailMessage(
                    subject, body, settings.DEFAULT_FROM_EMAIL, [notice.user.email]
                )
                senders.email(message)
            else:
                senders.webhook(notice.webhook_url, payload)
            delivered = True
        except Exception as exc:  # every failure of a channel is the user's to see, not ours
            log.warning("quota alert to %s by %s failed: %s", notice.user.pk, channel, exc)
            errors.append(f"{channel}: {_describe(exc)}")
    finished = timezone.now()
    for delivery in notice.deliveries:
        delivery.sent_at = finished if delivered else None
        delivery.status = DeliveryStatus.FAILED if errors else DeliveryStatus.SENT
        delivery.error = clamp_error("; ".join(errors))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, DeliveryError):
        return text
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def clamp_error(text: str) -> str:
    """An error as its column takes it: no NUL (PostgreSQL refuses it in text), at most
    DELIVERY_ERROR_MAX characters."""
    text = text.replace("\x00", "")
    if len(text) > DELIVERY_ERROR_MAX:
        text = text[: DELIVERY_ERROR_MAX - 1] + "…"
    return text


# --- The message --------------------------------------------------------------------------------


def _window_name(window: str) -> str:
    if window == AlertWindow.TOKENS_PER_DAY:
        return _("daily token quota")
    return _("hourly token limit")


def _zone() -> ZoneInfo:
    return ZoneInfo(settings.LIMITER_TIME_ZONE)


def _local(moment: datetime) -> str:
    local = timezone.localtime(moment, _zone())
    return f"{date_format(local, 'Y-m-d H:i')} {local.strftime('%Z')}".strip()


def portal_url(name: str) -> str:
    """An absolute link to a portal page (PORTAL_BASE_URL), or "" when no base is set."""
    if not settings.PORTAL_BASE_URL:
        return ""
    try:
        path = reverse(name)
    except NoReverseMatch:
        path = "/"
    return settings.PORTAL_BASE_URL + path


def _content(notice: Notice) -> tuple[str, str, dict[str, Any]]:
    """Subject, body and webhook payload, in the active language."""
    threshold = max(notice.thresholds)
    percent = notice.used * 100 / notice.limit
    window = _window_name(notice.window)
    figures = {
        "window": window,
        "threshold": threshold,
        "used": f"{notice.used:,}",
        "limit": f"{notice.limit:,}",
        "percent": f"{percent:.1f}",
        "moment": _local(notice.resets_at),
    }
    subject = _("[%(product)s] %(threshold)d%% of your %(window)s used") % {
        "product": _("Token Limiter"),
        **figures,
    }
    lines = [
        _("Hello %(user)s,") % {"user": notice.user.get_username()},
        "",
        _(
            "You have used %(used)s of your %(limit)s tokens (%(percent)s%%) of your "
            "%(window)s, past the %(threshold)d%% alert you set."
        )
        % figures,
    ]
    if notice.used >= notice.limit:
        lines.append(_("Requests that need more tokens are refused until the limit resets."))
    if notice.window == AlertWindow.TOKENS_PER_DAY:
        lines.append(_("The daily quota starts again at midnight: %(moment)s.") % figures)
    else:
        lines.append(
            _(
                "Tokens per hour are counted over the last 60 minutes: room comes back from "
                "%(moment)s."
            )
            % figures
        )
    usage, alerts = portal_url("portal:usage"), portal_url("portal:alerts")
    if usage:
        lines += ["", _("Your usage: %(url)s") % {"url": usage}]
    if alerts:
        lines.append(_("Change or turn off these alerts: %(url)s") % {"url": alerts})
    lines += ["", _("You receive this message because you set this alert.")]
    payload = {
        "type": "quota_alert",
        # Slack- and Teams-style incoming webhooks show "text" as the message.
        "text": subject,
        "user": notice.user.get_username(),
        "window": notice.window,
        "threshold_percent": threshold,
        "thresholds_crossed": sorted(notice.thresholds),
        "used": notice.used,
        "limit": notice.limit,
        "percent": round(percent, 1),
        "period_start": notice.period_start.astimezone(_zone()).isoformat(timespec="seconds"),
        "resets_at": notice.resets_at.astimezone(_zone()).isoformat(timespec="seconds"),
        "portal_url": alerts or None,
    }
    return subject, "\n".join(lines) + "\n", payload
