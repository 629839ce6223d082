"""Celery beat for the single-process quick start (no REDIS_URL, so no worker and no beat).

The gateway process runs the same CELERY_BEAT_SCHEDULE on a thread of its own, calling each
task eagerly (`task.apply()`), so roll-ups, SGLang telemetry and retention work on one box
exactly as they do with `celery -A limiter_site worker` / `beat` in production.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)


class EmbeddedBeat:
    def __init__(self, schedule: dict[str, dict[str, Any]]) -> None:
        self.schedule = schedule
        self.due = {name: time.monotonic() for name in schedule}
        self.runs: dict[str, int] = dict.fromkeys(schedule, 0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="embedded-beat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> float:
        """Run every task that is due; returns seconds until the next one is."""
        now = time.monotonic()
        for name, entry in self.schedule.items():
            if self.due[name] <= now:
                self.due[name] = now + float(entry["schedule"])
                try:
                    current_app.tasks[entry["task"]].apply(throw=True)
                    self.runs[name] += 1
                except Exception:
                    log.exception("embedded beat: %s failed", name)
                finally:
                    close_old_connections()
        return max(min(self.due.values()) - time.monotonic(), 0.05)

    def _run(self) -> None:
        while not self._stop.wait(self.tick()):
            pass


def embedded_beat() -> EmbeddedBeat | None:
    """The scheduler this process should run, if any (only without Redis, and not disabled)."""
    if settings.REDIS_URL or not settings.EMBEDDED_BEAT:
        return None
    current_app.loader.import_default_modules()  # registers the tasks of every app
    # Celery logs "Task … succeeded in …" at INFO for every eager run: with the ledger drained
    # every second that was a log line a second. Failures still log (ERROR, and ours above).
    trace = logging.getLogger("celery.app.trace")
    trace.setLevel(max(trace.getEffectiveLevel(), logging.WARNING))
    return EmbeddedBeat(settings.CELERY_BEAT_SCHEDULE)
