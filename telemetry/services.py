"""The only code that writes telemetry rows."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from telemetry.models import SGLangSample

if TYPE_CHECKING:
    from telemetry.sglang import Sample


def record_samples(samples: Iterable[Sample]) -> list[SGLangSample]:
    """Store scrapes of SGLang servers, in one INSERT."""
    rows = [SGLangSample(**sample.as_fields()) for sample in samples]
    return SGLangSample.objects.bulk_create(rows) if rows else []


def prune_samples(older_than: datetime) -> int:
    """Delete the samples scraped before `older_than`; returns how many went."""
    deleted, _ = SGLangSample.objects.filter(scraped_at__lt=older_than).delete()
    return deleted
