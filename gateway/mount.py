"""Routing between the gateway and Django inside Channels' ProtocolTypeRouter."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from gateway.asgi_io import Receive, Scope, Send

ASGIApp = Callable[..., Awaitable[Any]]
GATEWAY_PREFIXES = ("/v1/", "/health", "/metrics")


def mount_gateway(gateway: ASGIApp, django_app: ASGIApp) -> ASGIApp:
    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith(GATEWAY_PREFIXES):
            await gateway(scope, receive, send)
        else:
            await django_app(scope, receive, send)

    return route


def refuse_insecure_settings() -> None:
    # Daphne and uvicorn do not run Django's system checks; the security ones must still hold.
    errors = [e for e in checks.run_checks(tags=["security"]) if e.is_serious()]
    if errors:
        raise ImproperlyConfigured("; ".join(str(e) for e in errors))
