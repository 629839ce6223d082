"""Routing between the gateway and Django inside Channels' ProtocolTypeRouter."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from gateway.asgi_io import AsgiScope, Receive, Send

ASGIApp = Callable[..., Awaitable[Any]]
# The API's paths and their odd spellings (`//v1/…`, `/V1/…`, `/v1`): the gateway answers them
# all, unknown ones with a JSON 404, so an API client never gets Django's HTML page.
GATEWAY_PATHS = re.compile(r"/+(?:v1|health|metrics)(?:/|$)", re.IGNORECASE)


def mount_gateway(gateway: ASGIApp, django_app: ASGIApp) -> ASGIApp:
    async def route(scope: AsgiScope, receive: Receive, send: Send) -> None:
        if GATEWAY_PATHS.match(scope["path"]):
            await gateway(scope, receive, send)
        else:
            await django_app(scope, receive, send)

    return route


def refuse_insecure_settings() -> None:
    # Daphne and uvicorn do not run Django's system checks; the security ones must still hold.
    errors = [e for e in checks.run_checks(tags=["security"]) if e.is_serious()]
    if errors:
        raise ImproperlyConfigured("; ".join(str(e) for e in errors))
