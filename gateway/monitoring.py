"""Who may read `/metrics` and `/health/ready`: monitoring systems and staff, nobody else.

Monitoring presents `Authorization: Bearer <GATEWAY_MONITORING_TOKEN>` or connects from an
address in GATEWAY_MONITORING_ALLOWED_IPS (Prometheus on a private network). Readiness is also
open to a staff user's admin session, so an operator's browser can read it. Both settings are
empty by default: then these endpoints answer 403 to everyone but staff (a client address
behind a reverse proxy is the proxy's, so no address is trusted unless listed).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from http.cookies import CookieError, SimpleCookie
from importlib import import_module

from django.conf import settings

from gateway.asgi_io import AsgiScope, header
from gateway.errors import GatewayError

_session_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitoring-session")


def forbidden(what: str) -> GatewayError:
    return GatewayError(
        403,
        f"{what} needs the monitoring token (Authorization: Bearer …, GATEWAY_MONITORING_TOKEN) "
        "or a client address in GATEWAY_MONITORING_ALLOWED_IPS.",
        type_="permission_error",
        code="monitoring_forbidden",
    )


def is_monitoring(scope: AsgiScope) -> bool:
    token = settings.GATEWAY_MONITORING_TOKEN
    raw = header(scope, b"authorization")
    if token and raw is not None:
        scheme, _, given = raw.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token):
            return True
    client = scope.get("client")
    return client is not None and _address_allowed(str(client[0]))


def _address_allowed(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _networks(settings.GATEWAY_MONITORING_ALLOWED_IPS))


@cache
def _networks(spec: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in spec)


async def is_staff_session(scope: AsgiScope) -> bool:
    session_key = _session_cookie(scope)
    if session_key is None:
        return False
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_session_executor, _staff_session, session_key)


def _session_cookie(scope: AsgiScope) -> str | None:
    raw = header(scope, b"cookie")
    if raw is None:
        return None
    try:
        cookies = SimpleCookie(raw.decode("latin-1"))
    except CookieError:
        return None
    morsel = cookies.get(settings.SESSION_COOKIE_NAME)
    return morsel.value if morsel is not None and morsel.value else None


def _staff_session(session_key: str) -> bool:
    """What django.contrib.auth.get_user checks, for a cookie seen outside Django's stack."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, load_backend
    from django.db import close_old_connections
    from django.utils.crypto import constant_time_compare

    close_old_connections()
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user_id, backend = store.get(SESSION_KEY), store.get(BACKEND_SESSION_KEY)
    if user_id is None or backend not in settings.AUTHENTICATION_BACKENDS:
        return False
    user = load_backend(backend).get_user(user_id)
    if user is None or not (user.is_active and user.is_staff):
        return False
    session_hash = store.get(HASH_SESSION_KEY)
    return bool(session_hash) and constant_time_compare(session_hash, user.get_session_auth_hash())
