"""GET /api/v1/me: a user's limits and the live state of every window, read from the limiter
(the same backend, keys and arithmetic as the gateway's x-ratelimit-* headers)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Q
from django.utils import timezone

from accounts.models import ApiKey
from accounts.services import KEY_LIMIT_FIELDS
from api.authentication import ClientKey
from gateway.limits import read_live_state, user_scopes
from quotas.services import effective_limits_for, key_limits, user_plan
from tokenlimit.limiter import LIMIT_FIELDS, Limits, ScopeReading

WINDOWS = (
    # (window, WindowState attribute suffix, ScopeReading "used" attribute)
    ("requests_per_minute", "requests", "used_requests"),
    ("tokens_per_minute", "tokens", "used_tokens"),
    ("tokens_per_hour", "tokens_hour", "used_tokens_hour"),
    ("tokens_per_day", "tokens_day", "used_tokens_day"),
)


def me_payload(user: User, auth: Any) -> dict[str, Any]:
    """Everything /me answers; raises LimiterUnavailable when the shared limiter cannot be read."""
    plan = user_plan(user)
    limits = effective_limits_for(user)
    keys = _limited_keys(user, auth)
    key_scopes = [(key, kl) for key in keys if (kl := key_limits(key, limits)) is not None]
    readings = read_live_state(user_scopes(user.pk, limits, [(k.pk, kl) for k, kl in key_scopes]))
    now = timezone.now()
    scopes = [_scope("user", None, limits, readings[0], now)]
    scopes += [
        _scope("key", key, kl, reading, now)
        for (key, kl), reading in zip(key_scopes, readings[1:], strict=True)
    ]
    key = auth.key if isinstance(auth, ClientKey) else None
    return {
        "user": {
            "id": user.pk,
            "username": user.get_username(),
            "email": user.email,
            "is_staff": user.is_staff,
        },
        "plan": {
            "name": plan.name,
            "description": plan.description,
            "self_service_keys": plan.self_service_keys,
            "max_keys_per_user": plan.max_keys_per_user,
        },
        "credential": {
            "kind": "api_key" if key else "session",
            "key_id": key.pk if key else None,
            "key_prefix": key.prefix if key else None,
        },
        "limits": limits_dict(limits),
        "scopes": scopes,
        "time_zone": settings.LIMITER_TIME_ZONE,
        "checked_at": timezone.localtime(now),
    }


def _limited_keys(user: User, auth: Any) -> list[ApiKey]:
    """The keys whose own limits apply: the key in use, or (a session) every active key of the
    user that has any limit of its own."""
    if isinstance(auth, ClientKey):
        return [auth.key]
    has_own_limit = Q()
    for field in KEY_LIMIT_FIELDS:
        has_own_limit |= Q(**{f"{field}__isnull": False})
    return list(ApiKey.objects.filter(user=user).active().filter(has_own_limit).order_by("pk"))


def limits_dict(limits: Limits) -> dict[str, Any]:
    return {
        **{field: getattr(limits, field) for field in LIMIT_FIELDS},
        "allowed_models": list(limits.allowed_models),
    }


def _scope(
    kind: str, key: ApiKey | None, limits: Limits, reading: ScopeReading, now: datetime
) -> dict[str, Any]:
    windows = []
    for window, suffix, used in WINDOWS:
        reset = float(getattr(reading.state, f"reset_{suffix}"))
        windows.append(
            {
                "window": window,
                "limit": getattr(reading.state, f"limit_{suffix}"),
                "used": getattr(reading, used),
                "remaining": getattr(reading.state, f"remaining_{suffix}"),
                "reset_seconds": round(reset, 3),
                "resets_at": _moment(now, reset),
            }
        )
    cooldown = reading.cooldown_remaining
    return {
        "scope": kind,
        "key_id": key.pk if key else None,
        "key_prefix": key.prefix if key else None,
        "limits": limits_dict(limits),
        "windows": windows,
        "in_flight": reading.in_flight,
        "max_parallel_requests": reading.max_parallel,
        "cooldown_remaining_seconds": round(cooldown, 3),
        "cooldown_ends_at": _moment(now, cooldown) if cooldown > 0 else None,
    }


def _moment(now: datetime, seconds: float) -> datetime:
    """`now` plus `seconds`, in Asia/Seoul, to the second: the daily reset reads 00:00:00, not
    23:59:59.999998 (a window's reset is known to within the clock's float error)."""
    moment = now + timedelta(seconds=seconds) + timedelta(microseconds=500_000)
    return timezone.localtime(moment.replace(microsecond=0))
