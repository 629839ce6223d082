""" "사용량 알림": the user's quota alert thresholds per window with their state this period,
the form that sets them (quotas.alerts.set_quota_alerts, audited with the user as the actor)
and the latest notifications. The check that sends them is telemetry/alerts.py."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_http_methods

from gateway.limits import read_live_state, user_scopes
from portal.figures import level
from quotas.alerts import (
    SUGGESTED_PERCENTS,
    alert_settings,
    crossed,
    enabled_alerts,
    parse_percentages,
    period_end,
    period_start,
    recent_deliveries,
    set_quota_alerts,
    webhooks_enabled,
)
from quotas.models import WEBHOOK_URL_MAX, AlertWindow, QuotaAlert, QuotaAlertDelivery
from quotas.services import effective_limits_for
from tokenlimit.limiter import LimiterUnavailable, ScopeReading

RECENT_DELIVERIES = 20
# Form field prefix per window.
FIELDS = {AlertWindow.TOKENS_PER_DAY: "day", AlertWindow.TOKENS_PER_HOUR: "hour"}
USED = {
    AlertWindow.TOKENS_PER_DAY: "used_tokens_day",
    AlertWindow.TOKENS_PER_HOUR: "used_tokens_hour",
}
PERCENT_CHOICES = [(str(p), f"{p}%") for p in SUGGESTED_PERCENTS]


class AlertForm(forms.Form):
    day_percents = forms.MultipleChoiceField(
        label=gettext_lazy("Daily token quota"),
        choices=PERCENT_CHOICES,
        required=False,
        widget=forms.CheckboxSelectMultiple,
    )
    day_other = forms.CharField(
        label=gettext_lazy("Other percentages"),
        required=False,
        max_length=100,
        help_text=gettext_lazy("Whole numbers from 1 to 100, separated by commas, e.g. 75, 95."),
    )
    hour_percents = forms.MultipleChoiceField(
        label=gettext_lazy("Tokens per hour"),
        choices=PERCENT_CHOICES,
        required=False,
        widget=forms.CheckboxSelectMultiple,
    )
    hour_other = forms.CharField(
        label=gettext_lazy("Other percentages"),
        required=False,
        max_length=100,
        help_text=gettext_lazy("Whole numbers from 1 to 100, separated by commas, e.g. 75, 95."),
    )
    email_enabled = forms.BooleanField(label=gettext_lazy("Send me an email"), required=False)
    webhook_url = forms.CharField(
        label=gettext_lazy("Webhook URL (optional)"),
        required=False,
        max_length=WEBHOOK_URL_MAX,
        widget=forms.URLInput(attrs={"placeholder": "https://hooks.example.com/…"}),
        help_text=gettext_lazy(
            "We POST a JSON message to this address as well (a Slack or Teams incoming "
            "webhook shows its “text”). Empty: email only."
        ),
    )

    def __init__(self, *args: Any, webhooks: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not webhooks:
            # Not offered at all: the operator has not enabled webhooks (QUOTA_ALERT_WEBHOOKS).
            del self.fields["webhook_url"]

    def clean_day_other(self) -> list[int]:
        return parse_percentages(self.cleaned_data.get("day_other", ""))

    def clean_hour_other(self) -> list[int]:
        return parse_percentages(self.cleaned_data.get("hour_other", ""))

    def thresholds(self) -> dict[str, list[int]]:
        data = self.cleaned_data
        return {
            window: sorted(
                {int(p) for p in data[f"{prefix}_percents"]} | set(data[f"{prefix}_other"])
            )
            for window, prefix in FIELDS.items()
        }

    def add_service_errors(self, exc: ValidationError) -> None:
        if not hasattr(exc, "error_dict"):
            self.add_error(None, exc)
            return
        for name, errors in exc.error_dict.items():
            target = f"{FIELDS[AlertWindow(name)]}_other" if name in FIELDS else name
            self.add_error(target if target in self.fields else None, errors)


def initial(alerts: list[QuotaAlert], email_enabled: bool, webhook_url: str) -> dict[str, Any]:
    values: dict[str, Any] = {"email_enabled": email_enabled, "webhook_url": webhook_url}
    for window, prefix in FIELDS.items():
        mine = [a.threshold_percent for a in alerts if a.window == window]
        values[f"{prefix}_percents"] = [str(p) for p in mine if p in SUGGESTED_PERCENTS]
        values[f"{prefix}_other"] = ", ".join(str(p) for p in mine if p not in SUGGESTED_PERCENTS)
    return values


@dataclass(frozen=True, slots=True)
class ThresholdRow:
    percent: int
    tokens: int  # the use at which it fires; 0 without a limit
    reached: bool
    delivery: QuotaAlertDelivery | None  # this period's


@dataclass(frozen=True, slots=True)
class WindowCard:
    window: str
    label: str
    limit: int  # 0: no limit
    used: int | None  # None: the limiter could not be read
    percent: float
    level: str
    period_start: datetime
    period_end: datetime
    rows: list[ThresholdRow]
    checkbox: forms.BoundField
    other: forms.BoundField


def window_cards(
    form: AlertForm,
    alerts: list[QuotaAlert],
    reading: ScopeReading | None,
    limits: dict[str, int],
    this_period: dict[tuple[int, datetime], QuotaAlertDelivery],
    now: datetime,
) -> list[WindowCard]:
    cards = []
    for window, prefix in FIELDS.items():
        limit = limits[window]
        used = int(getattr(reading, USED[window])) if reading is not None else None
        percent = min(used * 100 / limit, 999.0) if limit and used is not None else 0.0
        start = period_start(window, now)
        rows = [
            ThresholdRow(
                percent=alert.threshold_percent,
                tokens=math.ceil(limit * alert.threshold_percent / 100),
                reached=used is not None and crossed(used, limit, alert.threshold_percent),
                delivery=this_period.get((alert.pk, start)),
            )
            for alert in alerts
            if alert.window == window
        ]
        cards.append(
            WindowCard(
                window=window,
                label=str(form.fields[f"{prefix}_percents"].label),
                limit=limit,
                used=used,
                percent=round(percent, 1),
                level=(level(percent) if limit else "idle"),
                period_start=start,
                period_end=period_end(window, start),
                rows=rows,
                checkbox=form[f"{prefix}_percents"],
                other=form[f"{prefix}_other"],
            )
        )
    return cards


@require_http_methods(["GET", "POST"])
@login_required
def alerts(request: HttpRequest) -> HttpResponse:
    user = cast(User, request.user)
    webhooks = webhooks_enabled()
    mine = enabled_alerts(user)
    own = alert_settings(user)
    if request.method == "POST":
        form = AlertForm(request.POST, webhooks=webhooks)
        if form.is_valid():
            try:
                changed = set_quota_alerts(
                    user,
                    actor=user,
                    thresholds=form.thresholds(),
                    email_enabled=form.cleaned_data["email_enabled"],
                    webhook_url=form.cleaned_data["webhook_url"] if webhooks else None,
                )
            except ValidationError as exc:
                form.add_service_errors(exc)
            else:
                if changed:
                    messages.success(request, _("Your alerts were saved."))
                else:
                    messages.info(request, _("Nothing changed."))
                return redirect("portal:alerts")
    else:
        form = AlertForm(
            initial=initial(mine, own.email_enabled, own.webhook_url), webhooks=webhooks
        )
    return render(
        request,
        "portal/alerts.html",
        _context(user, form, mine, own.email_enabled, own.webhook_url, webhooks),
        status=400 if form.errors else 200,
    )


def _context(
    user: User,
    form: AlertForm,
    mine: list[QuotaAlert],
    email_enabled: bool,
    webhook_url: str,
    webhooks: bool,
) -> dict[str, Any]:
    now = timezone.now()
    limits = effective_limits_for(user)
    try:
        reading: ScopeReading | None = read_live_state(user_scopes(user.pk, limits))[0]
    except LimiterUnavailable:
        reading = None
    this_period: dict[tuple[int, datetime], QuotaAlertDelivery] = {}
    if mine:
        starts = {period_start(window, now) for window in FIELDS}
        for delivery in QuotaAlertDelivery.objects.filter(alert__in=mine, period_start__in=starts):
            this_period[(delivery.alert_id, delivery.period_start)] = delivery
    by_window: dict[str, int] = {str(window): getattr(limits, window) for window in FIELDS}
    return {
        "form": form,
        "cards": window_cards(form, mine, reading, by_window, this_period, now),
        "live_unavailable": reading is None,
        "has_alerts": bool(mine),
        "email_enabled": email_enabled,
        "email": user.email,
        "webhooks": webhooks,
        "webhook_url": webhook_url if webhooks else "",
        "recent": list(recent_deliveries(user, RECENT_DELIVERIES)),
    }
