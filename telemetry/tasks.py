"""Celery tasks of the telemetry app (schedule: CELERY_BEAT_SCHEDULE in the settings)."""

from __future__ import annotations

import asyncio
from typing import Any

from celery import shared_task

# --- SGLang samples -----------------------------------------------------------------------------


@shared_task(name="telemetry.tasks.scrape_sglang", ignore_result=True)
def scrape_sglang() -> int:
    """Scrape every distinct upstream of the active served models once; returns how many."""
    from telemetry import services, sglang

    samples = asyncio.run(sglang.scrape_all(sglang.upstream_targets()))
    recorded = services.record_samples(samples)
    publish_sglang(samples)
    return len(recorded)


def publish_sglang(samples: list[Any]) -> None:
    """Push the GPU side to the staff dashboards (`/ws/stats/`)."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from gateway.stats import STATS_GROUP

    layer = get_channel_layer()
    if layer is None:
        return
    summary = {
        "upstreams": [
            {
                "url": s.upstream_url,
                "ok": s.ok,
                "running_requests": s.running_requests,
                "queued_requests": s.queued_requests,
                "kv_cache_usage": s.kv_cache_usage,
                "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
                "generation_throughput": s.generation_throughput,
                # Cumulative: the console divides the growth of sum by that of count.
                "ttft_sum": s.ttft_sum,
                "ttft_count": s.ttft_count,
            }
            for s in samples
        ]
    }
    async_to_sync(layer.group_send)(STATS_GROUP, {"type": "stats.sglang", "summary": summary})


# --- Usage roll-ups -----------------------------------------------------------------------------


@shared_task(name="telemetry.tasks.roll_up_usage", ignore_result=True)
def roll_up_usage() -> dict[str, Any]:
    """Recompute the roll-up cells touched by ledger rows written since the last run."""
    from telemetry import rollups

    return rollups.roll_up_recent()


# --- Quota alerts -------------------------------------------------------------------------------


@shared_task(name="telemetry.tasks.check_quota_alerts", ignore_result=True)
def check_quota_alerts() -> dict[str, Any]:
    """Tell users whose usage crossed one of their alert thresholds (telemetry/alerts.py)."""
    from dataclasses import asdict

    from telemetry import alerts

    return asdict(alerts.check_quota_alerts())


# --- Retention ----------------------------------------------------------------------------------


@shared_task(name="telemetry.tasks.prune", ignore_result=True)
def prune() -> dict[str, int]:
    """Delete raw data past its retention; returns rows deleted per kind."""
    from telemetry import rollups, services

    deleted = {"sglang_samples": services.prune_samples()}  # TELEMETRY_RETENTION_DAYS
    # LEDGER_RETENTION_DAYS, whole local days, only rows already rolled up; roll-ups are kept.
    deleted["usage_records"] = rollups.prune_ledger()
    return deleted


@shared_task(name="telemetry.tasks.refit_estimators", ignore_result=True)
def refit_estimators() -> int:
    """Refit the token estimator of models without a tokenizer from the ledger."""
    from gateway.services import refit_estimators as refit

    return len(refit())
