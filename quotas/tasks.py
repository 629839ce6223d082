"""Celery tasks of the quotas app (thin: the work is in quotas/ledger_stream.py)."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from quotas import ledger_stream


@shared_task(ignore_result=True)
def drain_ledger() -> int:
    """Write the usage events gateways appended to the ledger stream (beat: every second)."""
    if not settings.REDIS_URL:
        return 0  # embedded mode: gateways write the database themselves
    return ledger_stream.drain()
