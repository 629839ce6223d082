"""The REST API's own rate limit, per user, in the shared cache (Redis when REDIS_URL is set, so
that N gateway replicas count together). Separate from the gateway's token limits: this only
keeps scripts from hammering the database with reports."""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle

from api.authentication import OperatorCredential


class ApiUserThrottle(SimpleRateThrottle):
    """API_THROTTLE_CLIENT per user for clients, API_THROTTLE_OPERATOR for operators."""

    scope = "client"

    def allow_request(self, request: Request, view: Any) -> bool:
        self.scope = "operator" if _is_operator(request) else "client"
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        if not request.user or not request.user.is_authenticated:
            return None  # refused by the permissions anyway, before any work
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}


def _is_operator(request: Request) -> bool:
    return bool(request.user and request.user.is_staff) and (
        request.auth is None or isinstance(request.auth, OperatorCredential)
    )
