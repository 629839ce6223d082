"""Celery tasks of the quotas app (thin: the work is in quotas/ledger_stream.py)."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings

from quotas import ledger_stream

log = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def drain_ledger() -> int:
    """Write the usage events gateways appended to the ledger stream (beat: every second)."""
    if not settings.REDIS_URL:
        return 0  # embedded mode: gateways write the database themselves
    return ledger_stream.drain()


@worker_ready.connect
def check_redis_persistence(**_: Any) -> None:
    """Said at the worker's start too: a Redis without its append-only file loses the stream."""
    if not settings.REDIS_URL:
        return
    connection = ledger_stream.client()
    try:
        problem = ledger_stream.check_persistence(connection)
    except Exception:
        log.warning("could not check Redis persistence", exc_info=True)
        return
    finally:
        connection.close()
    if problem:
        log.error("%s", problem)
