"""Admin: SGLang samples, read-only (rows are written by the scrape task only)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.auth.models import User
from django.contrib.humanize.templatetags.humanize import intcomma
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from accounts import admin as accounts_admin
from accounts.admin import ReadOnlyAdmin
from accounts.models import ApiKey
from gateway.admin import ServedModelFilter
from quotas import admin as quotas_admin
from quotas.admin import EstimatedCountPaginator
from telemetry.exports import csv_lines, rollup_export
from telemetry.models import SGLangSample, UsageRollup
from telemetry.rollups import local_zone
from telemetry.usage import UsageTotals, usage_report


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.1%}"


@admin.register(SGLangSample)
class SGLangSampleAdmin(ReadOnlyAdmin):
    list_display = (
        "scraped_at",
        "upstream_url",
        "ok",
        "running_requests",
        "queued_requests",
        "kv_cache_usage_shown",
        "prefix_cache_hit_rate_shown",
        "generation_throughput_shown",
    )
    list_filter = ("upstream_url", "ok")
    ordering = ("-scraped_at",)
    # A sample every few seconds per server: no COUNT(*) over the whole table on each page.
    show_full_result_count = False
    list_per_page = 100

    @admin.display(description=_("KV-cache usage"), ordering="kv_cache_usage")
    def kv_cache_usage_shown(self, sample: SGLangSample) -> str | None:
        return _percent(sample.kv_cache_usage)

    @admin.display(description=_("prefix-cache hit rate"), ordering="prefix_cache_hit_rate")
    def prefix_cache_hit_rate_shown(self, sample: SGLangSample) -> str | None:
        return _percent(sample.prefix_cache_hit_rate)

    @admin.display(
        description=_("generation throughput (tokens/s)"), ordering="generation_throughput"
    )
    def generation_throughput_shown(self, sample: SGLangSample) -> str | None:
        value = sample.generation_throughput
        return None if value is None else f"{value:,.1f}"


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    """Roll-ups are recomputed from the ledger by telemetry.rollups: viewable, never edited."""

    list_display = (
        "period_start", "period", "user", "model", "requests", "prompt_tokens",
        "completion_tokens", "cached_tokens", "errors", "rate_limited", "latency_p50_ms",
        "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms", "updated_at",
    )  # fmt: skip
    # The model list comes from ServedModel, not a DISTINCT over the roll-ups.
    list_filter = ("period", ServedModelFilter, ("period_start", admin.DateFieldListFilter))
    search_fields = ("user__username",)  # searched exactly by get_search_results below
    search_help_text = _("An exact username.")
    list_select_related = ("user",)
    ordering = ("-period_start", "user", "model")
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    actions = ["export_csv"]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        user_ids = User.objects.filter(username=term).values_list("pk", flat=True)
        return queryset.filter(user_id__in=list(user_ids)), False

    @admin.action(description=_("Export selected roll-ups as CSV"))
    def export_csv(
        self, request: HttpRequest, queryset: QuerySet[UsageRollup]
    ) -> StreamingHttpResponse:
        response = StreamingHttpResponse(
            csv_lines(rollup_export(queryset)), content_type="text/csv; charset=utf-8"
        )
        response["Content-Disposition"] = 'attachment; filename="usage-rollups.csv"'
        return response


# --- Usage on a user's and a key's page ----------------------------------------------------------

# (label, days): today is the current Seoul day; 7 and 30 days end with it.
USAGE_SPANS = ((_("today"), 1), (_("7 days"), 7), (_("30 days"), 30))


def usage_by_span(*, user_id: int | None, api_key_id: int | None) -> list[tuple[str, UsageTotals]]:
    """Usage over each span of USAGE_SPANS, from one daily report (one or two queries)."""
    now = timezone.now()
    today = timezone.localtime(now, local_zone()).replace(hour=0, minute=0, second=0, microsecond=0)
    longest = max(days for _label, days in USAGE_SPANS)
    start = today - timedelta(days=longest - 1)
    report = usage_report(
        user_id=user_id, period="day", start=start, end=now, api_key_id=api_key_id
    )
    spans = []
    for label, days in USAGE_SPANS:
        since = today - timedelta(days=days - 1)
        buckets = [b for b in report.series if b.start >= since]
        spans.append((str(label), _summed(buckets)))
    return spans


def _summed(buckets: list[Any]) -> UsageTotals:
    fields = UsageTotals.__dataclass_fields__.keys() - {"total_tokens"}
    return UsageTotals(**{name: sum(getattr(b, name) for b in buckets) for name in fields})


def usage_table(spans: list[tuple[str, UsageTotals]], element_id: str) -> str:
    header = format_html(
        "<tr><th></th>" + '<th class="num">{}</th>' * 6 + "</tr>",
        gettext("requests"),
        gettext("prompt tokens"),
        gettext("completion tokens"),
        gettext("total tokens"),
        gettext("rate limited"),
        gettext("errors"),
    )
    rows = format_html_join(
        "",
        "<tr><th>{}</th>" + '<td class="num">{}</td>' * 6 + "</tr>",
        (
            (
                label,
                intcomma(totals.requests),
                intcomma(totals.prompt_tokens),
                intcomma(totals.completion_tokens),
                intcomma(totals.total_tokens),
                intcomma(totals.rate_limited),
                intcomma(totals.errors),
            )
            for label, totals in spans
        ),
    )
    table = '<table class="admin-summary" id="{}">{}{}</table>'
    return format_html(table, element_id, header, rows)


def _ledger_link(**query: Any) -> str:
    url = f"{reverse('admin:quotas_usagerecord_changelist')}?{urlencode(query)}"
    return format_html('<p><a href="{}">{}</a></p>', url, gettext("Requests in the ledger"))


# The key page of accounts/admin.py, with the key's usage: this layer knows the reports.
admin.site.unregister(ApiKey)


@admin.register(ApiKey)
class ApiKeyAdmin(accounts_admin.ApiKeyAdmin):
    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        fields = super().get_fields(request, obj)
        return fields if obj is None else (*fields[:-1], "usage", fields[-1])

    @admin.display(description=_("usage"))
    def usage(self, key: ApiKey) -> str:
        spans = usage_by_span(user_id=None, api_key_id=key.pk)
        note = format_html(
            '<p class="help">{}</p>',
            gettext("From the ledger, Seoul days; today started at midnight (KST) %(day)s.")
            % {"day": date_format(timezone.localdate(), "Y-m-d")},
        )
        return format_html(
            "{}{}{}", usage_table(spans, "key-usage"), note, _ledger_link(api_key__id__exact=key.pk)
        )


# The user page of quotas/admin.py, with the user's usage.
admin.site.unregister(User)


@admin.register(User)
class UserAdmin(quotas_admin.UserAdmin):
    summary_fields = (*quotas_admin.UserAdmin.summary_fields, "usage")

    @admin.display(description=_("usage"))
    def usage(self, user: User) -> str:
        spans = usage_by_span(user_id=user.pk, api_key_id=None)
        return format_html(
            "{}{}", usage_table(spans, "user-usage"), _ledger_link(user__id__exact=user.pk)
        )
