"""The operator console (staff only): live tiles and a rolling chart fed by `/ws/stats/`
(portal/static/portal/console.js does the live part) and, server-rendered, the range figures
from telemetry.console (today / 7 days / 30 days from Seoul midnight)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_GET

from telemetry.console import (
    DEFAULT_BY,
    DEFAULT_RANGE,
    RANGES,
    TOP_BY,
    admin_filter,
    console_figures,
)

RANGE_LABELS = {
    "today": gettext_lazy("Today"),
    "7d": gettext_lazy("7 days"),
    "30d": gettext_lazy("30 days"),
}
BY_LABELS = {
    "tokens": gettext_lazy("Total tokens"),
    "requests": gettext_lazy("Requests"),
    "rate_limited": gettext_lazy("429s"),
}
# Where the live tiles turn amber / red; console.js reads them from the page (json_script).
THRESHOLDS: dict[str, dict[str, float]] = {
    "rate_limited_per_second": {"warn": 0.01, "bad": 1.0},
    "errors_per_second": {"warn": 0.01, "bad": 0.5},
    "queued_requests": {"warn": 1, "bad": 10},
    "kv_cache_usage": {"warn": 0.8, "bad": 0.9},
}
# The "overloaded" banner: an upstream with queued requests in this many consecutive samples,
# or a KV cache at least this full (SGLang then retracts or queues new requests).
OVERLOAD_QUEUED_SAMPLES = 3
OVERLOAD_KV_USAGE = 0.9
STALE_SECONDS = 5  # a gateway process silent this long is dropped from the sums


def _ledger_url(**lookups: Any) -> str:
    return reverse("admin:quotas_usagerecord_changelist") + admin_filter(**lookups)


@require_GET
@login_required
def console(request: HttpRequest) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied
    range_name = request.GET.get("range", DEFAULT_RANGE)
    by = request.GET.get("by", DEFAULT_BY)
    figures = console_figures(range_name, by)
    since = {"started_at__gte": figures.start}
    context = {
        "f": figures,
        "ranges": [(key, RANGE_LABELS[key]) for key in RANGES],
        "orders": [(key, BY_LABELS[key]) for key in TOP_BY],
        "range_label": RANGE_LABELS[figures.range],
        # (row, link to the ledger's admin list filtered to it and to the range)
        "users": [(u, _ledger_url(user__id__exact=u.user_id, **since)) for u in figures.users],
        "keys": [(k, _ledger_url(api_key__id__exact=k.api_key_id, **since)) for k in figures.keys],
        "models": [(m, t, _ledger_url(model=m, **since)) for m, t in figures.models],
        "errors": [
            (kind, n, _ledger_url(error_type__exact=kind, status_code__gte=400, **since))
            for kind, n in figures.errors
        ],
        "refusals": [
            (kind, n, _ledger_url(error_type__exact=kind, status_code__exact=429, **since))
            for kind, n in figures.refusals
        ],
        "dead_letter_url": reverse("admin:quotas_ledgerdeadletter_changelist")
        + admin_filter(replayed_at__isnull="True"),
        "models_admin_url": reverse("admin:gateway_servedmodel_changelist"),
        "live_config": _live_config(),
        "overload_kv_percent": round(OVERLOAD_KV_USAGE * 100),
    }
    return render(request, "console/console.html", context)


def _live_config() -> dict[str, Any]:
    """What console.js needs from the server: the thresholds, the overload rule, its texts."""
    return {
        "thresholds": THRESHOLDS,
        "overload": {"queued_samples": OVERLOAD_QUEUED_SAMPLES, "kv_usage": OVERLOAD_KV_USAGE},
        "stale_seconds": STALE_SECONDS,
        "texts": {
            "open": _("Live"),
            "closed": _("Disconnected: reconnecting…"),
            "processes": _("%(n)s gateway processes reporting"),
            "no_upstreams": _(
                "No GPU server has reported yet (the scrape runs every few seconds)."
            ),
            "unreachable": _("unreachable"),
            "overloaded": _("Overloaded: %(reasons)s"),
            "queued_reason": _("%(url)s has had queued requests for %(n)s samples"),
            "kv_reason": _("%(url)s KV cache %(percent)s full"),
            "requests": _("Requests/s"),
            "tokens": _("Tokens/s"),
            "rate_limited": _("429/s"),
            "errors": _("Errors/s"),
            "in_flight": _("In flight"),
        },
    }
