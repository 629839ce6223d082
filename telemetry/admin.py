"""Admin: SGLang samples, read-only (rows are written by the scrape task only)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from telemetry.models import SGLangSample


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.1%}"


@admin.register(SGLangSample)
class SGLangSampleAdmin(admin.ModelAdmin):
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

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: SGLangSample | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: SGLangSample | None = None) -> bool:
        return False
