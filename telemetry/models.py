"""Roll-ups of the usage ledger and samples of SGLang's own metrics."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _


class Period(models.TextChoices):
    MINUTE = "minute", _("minute")
    HOUR = "hour", _("hour")
    DAY = "day", _("day (Asia/Seoul)")


class UsageRollup(models.Model):
    """Per user × model × period: what the ledger says, summed; rewritten as late rows arrive."""

    period = models.CharField(_("period"), max_length=6, choices=Period.choices)
    # Minute and hour: UTC-aligned starts; day: local midnight in settings.LIMITER_TIME_ZONE.
    period_start = models.DateTimeField(_("period start"))
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        related_name="usage_rollups",
        verbose_name=_("user"),
    )
    model = models.CharField(_("model"), max_length=200, blank=True)
    requests = models.PositiveIntegerField(_("requests"), default=0)
    prompt_tokens = models.PositiveBigIntegerField(_("prompt tokens"), default=0)
    completion_tokens = models.PositiveBigIntegerField(_("completion tokens"), default=0)
    cached_tokens = models.PositiveBigIntegerField(_("cached tokens"), default=0)
    errors = models.JSONField(_("errors by type"), default=dict, blank=True)
    rate_limited = models.JSONField(_("429s by limit"), default=dict, blank=True)
    latency_p50_ms = models.FloatField(_("latency p50 (ms)"), null=True, blank=True)
    latency_p95_ms = models.FloatField(_("latency p95 (ms)"), null=True, blank=True)
    ttft_p50_ms = models.FloatField(_("time to first token p50 (ms)"), null=True, blank=True)
    ttft_p95_ms = models.FloatField(_("time to first token p95 (ms)"), null=True, blank=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("usage roll-up")
        verbose_name_plural = _("usage roll-ups")
        constraints = [
            models.UniqueConstraint(
                fields=["period", "period_start", "user", "model"], name="one_rollup_per_cell"
            )
        ]
        indexes = [
            models.Index(fields=["period", "period_start"]),
            # One user's report (telemetry.usage): that user's cells of a period in a range,
            # without walking every user's cells of the range.
            models.Index(fields=["user", "period", "period_start"]),
        ]

    def __str__(self) -> str:
        return f"{self.period} {self.period_start:%Y-%m-%d %H:%M} {self.user_id} {self.model}"


class SGLangSample(models.Model):
    """One scrape of one SGLang server: gauges as read, counters and histogram sums as totals."""

    upstream_url = models.CharField(_("upstream URL"), max_length=300)
    scraped_at = models.DateTimeField(_("scraped"), db_index=True)
    ok = models.BooleanField(_("reachable"), default=True)
    error = models.CharField(_("error"), max_length=300, blank=True)
    model_name = models.CharField(_("model"), max_length=200, blank=True)
    running_requests = models.FloatField(_("running requests"), null=True)
    queued_requests = models.FloatField(_("queued requests"), null=True)
    kv_cache_usage = models.FloatField(_("KV-cache usage"), null=True)
    prefix_cache_hit_rate = models.FloatField(_("prefix-cache hit rate"), null=True)
    generation_throughput = models.FloatField(_("generation throughput (tokens/s)"), null=True)
    prompt_tokens_total = models.FloatField(_("prompt tokens (total)"), null=True)
    generation_tokens_total = models.FloatField(_("generated tokens (total)"), null=True)
    cached_tokens_total = models.FloatField(_("cached tokens (total)"), null=True)
    requests_total = models.FloatField(_("requests (total)"), null=True)
    aborted_requests_total = models.FloatField(_("aborted requests (total)"), null=True)
    # Histogram sums and counts: the mean over any two samples is Δsum / Δcount.
    ttft_sum = models.FloatField(null=True)
    ttft_count = models.FloatField(null=True)
    itl_sum = models.FloatField(null=True)
    itl_count = models.FloatField(null=True)
    e2e_sum = models.FloatField(null=True)
    e2e_count = models.FloatField(null=True)
    server_info = models.JSONField(_("server info"), default=dict, blank=True)
    load = models.JSONField(_("load"), default=list, blank=True)

    class Meta:
        verbose_name = _("SGLang sample")
        verbose_name_plural = _("SGLang samples")
        indexes = [models.Index(fields=["upstream_url", "scraped_at"])]

    def __str__(self) -> str:
        return f"{self.upstream_url} @ {self.scraped_at:%Y-%m-%d %H:%M:%S}"


class RollupCursor(models.Model):
    """Where a periodic job stopped reading an append-only table (one row per name)."""

    name = models.CharField(_("name"), max_length=50, unique=True)
    state = models.JSONField(_("state"), default=dict)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("roll-up cursor")
        verbose_name_plural = _("roll-up cursors")

    def __str__(self) -> str:
        return self.name
