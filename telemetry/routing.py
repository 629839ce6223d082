"""Websocket routes, and the origins allowed to open them."""

from __future__ import annotations

from django.conf import settings
from django.urls import path

from telemetry.consumers import StatsConsumer

websocket_urlpatterns = [path("ws/stats/", StatsConsumer.as_asgi())]
DEVELOPMENT_HOSTS = ["localhost", "127.0.0.1", "[::1]"]


def allowed_origins() -> list[str]:
    """Pages that may open our websockets with a staff member's cookie: our own host names.

    Never "*", even if ALLOWED_HOSTS has it: any site a staff member visits could otherwise
    read the live feed in their name (cross-site websocket hijacking).
    """
    hosts = [host for host in settings.ALLOWED_HOSTS if host != "*"]
    if settings.DEBUG and not hosts:
        hosts = DEVELOPMENT_HOSTS
    return [*hosts, *settings.CSRF_TRUSTED_ORIGINS]
