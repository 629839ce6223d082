"""The single-process quick start runs the beat schedule in the gateway process, eagerly."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.embedded_beat import EmbeddedBeat, embedded_beat
from quotas.models import UsageRecord
from telemetry.models import UsageRollup

pytestmark = pytest.mark.django_db(transaction=True)


def test_due_tasks_run_eagerly_on_schedule(settings: Any) -> None:
    settings.REDIS_URL = ""
    settings.EMBEDDED_BEAT = True
    settings.CELERY_BEAT_SCHEDULE = {
        "roll-up-usage": {"task": "telemetry.tasks.roll_up_usage", "schedule": 60.0},
    }
    from django.utils import timezone

    UsageRecord.objects.create(
        request_id="beat-1", model="m", endpoint="chat/completions", status_code=200,
        prompt_tokens=5, completion_tokens=7, started_at=timezone.now(), finished_at=timezone.now(),
    )  # fmt: skip
    beat = embedded_beat()
    assert isinstance(beat, EmbeddedBeat)
    wait = beat.tick()
    assert beat.runs["roll-up-usage"] == 1
    assert 55 < wait <= 60  # not due again for a minute
    assert beat.tick() and beat.runs["roll-up-usage"] == 1
    assert UsageRollup.objects.filter(period="day", completion_tokens=7).exists()


@pytest.mark.parametrize(
    ("redis_url", "enabled"), [("redis://127.0.0.1:6379/0", True), ("", False)]
)
def test_no_embedded_beat_with_redis_or_when_disabled(
    settings: Any, redis_url: str, enabled: bool
) -> None:
    settings.REDIS_URL = redis_url
    settings.EMBEDDED_BEAT = enabled
    assert embedded_beat() is None


def test_the_single_process_mode_logs_no_line_per_periodic_task(settings: Any) -> None:
    """Eager task runs logged "Task … succeeded" at INFO, once a second for the ledger drain;
    the scraper's httpx client logged every request. Failures still log (WARNING and up)."""
    import logging

    settings.REDIS_URL = ""
    settings.EMBEDDED_BEAT = True
    trace = logging.getLogger("celery.app.trace")
    trace.setLevel(logging.NOTSET)
    assert embedded_beat() is not None
    assert not trace.isEnabledFor(logging.INFO) and trace.isEnabledFor(logging.WARNING)
    scraper = logging.getLogger("httpx")
    assert not scraper.isEnabledFor(logging.INFO) and scraper.isEnabledFor(logging.WARNING)
