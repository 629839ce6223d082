"""Who may call what: clients read and manage their own things; operators run the platform."""

from __future__ import annotations

from typing import Any

from rest_framework import permissions
from rest_framework.request import Request

from api.authentication import ClientKey, OperatorCredential


class IsClient(permissions.BasePermission):
    """A user acting for themselves: by their API key or their session. An operator token is
    not a user's client credential (it acts for scripts, not for a person's usage)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if user is None or not user.is_authenticated or not user.is_active:
            return False
        return not isinstance(request.auth, OperatorCredential)


class IsOperator(permissions.BasePermission):
    """A staff session, or an operator token (read scope: safe methods only). Never a client
    key, even one belonging to a staff user: a leaked client key must not run the platform."""

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if user is None or not user.is_authenticated or not user.is_active or not user.is_staff:
            return False
        if isinstance(request.auth, ClientKey):
            return False
        if isinstance(request.auth, OperatorCredential):
            return request.method in permissions.SAFE_METHODS or request.auth.can_write
        return True  # a staff session (CSRF is enforced by SessionAuthentication)
