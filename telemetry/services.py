"""The only code that writes telemetry rows."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, Protocol

from django.conf import settings
from django.utils import timezone

from telemetry.models import SGLangSample


class Scraped(Protocol):
    """One scrape of one SGLang server (telemetry/sglang.py's Sample)."""

    def as_fields(self) -> dict[str, Any]: ...


def record_samples(samples: Iterable[Scraped]) -> list[SGLangSample]:
    """Store scrapes of SGLang servers, in one INSERT."""
    rows = [SGLangSample(**sample.as_fields()) for sample in samples]
    return SGLangSample.objects.bulk_create(rows) if rows else []


def prune_samples(now: datetime | None = None) -> int:
    """Delete samples older than TELEMETRY_RETENTION_DAYS; returns how many went."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.TELEMETRY_RETENTION_DAYS)
    deleted, _ = SGLangSample.objects.filter(scraped_at__lt=cutoff).delete()
    return deleted
