"""Pre-flight check of the Redis the ledger ships usage events through (deploy only)."""

from __future__ import annotations

from typing import Any

import redis
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.translation import gettext

from quotas import ledger_stream


@register("limiter", deploy=True)
def check_redis_persistence(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    if not settings.REDIS_URL:
        return [
            Warning(
                gettext("REDIS_URL is not set: limits are counted in each process alone."),
                hint=gettext(
                    "Several gateway processes need one Redis to share limits and the ledger "
                    "stream; set REDIS_URL (README, “Production”)."
                ),
                id="quotas.W010",
            )
        ]
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=3, socket_timeout=3)
    try:
        problem = ledger_stream.check_persistence(client)
    except redis.RedisError as exc:
        problem = gettext("Redis does not answer: %(error)s") % {"error": exc}
    finally:
        client.close()
    if problem:
        return [
            Error(
                problem,
                hint=gettext(
                    "Run Redis with `--appendonly yes` (deploy/compose.yaml does), or set "
                    "LEDGER_REDIS_PERSISTENCE=trust if a managed Redis keeps it and hides CONFIG."
                ),
                id="quotas.E011",
            )
        ]
    return []
