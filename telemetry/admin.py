"""Admin: SGLang samples, read-only (rows are written by the scrape task only)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse
from django.utils.translation import gettext_lazy as _

from accounts.admin import ReadOnlyAdmin
from gateway.admin import ServedModelFilter
from quotas.admin import EstimatedCountPaginator
from telemetry.exports import csv_lines, rollup_export
from telemetry.models import SGLangSample, UsageRollup


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
