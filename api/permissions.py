"""Who may call what: clients read and manage their own things; operators run the platform.

A refusal says why (DRF takes `message` and `code` from the permission that refused)."""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from rest_framework import permissions
from rest_framework.request import Request

from api.authentication import ClientKey, OperatorCredential


class IsClient(permissions.BasePermission):
    """A user acting for themselves: by their API key or their session. An operator token is
    not a user's client credential (it acts for scripts, not for a person's usage)."""

    message = _("Operator tokens cannot use client endpoints; use an API key or a session.")
    code = "operator_token_not_allowed"

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
        if user is None or not user.is_authenticated or not user.is_active:
            return False
        if isinstance(request.auth, ClientKey):
            return self._refuse(
                _("API keys cannot use operator endpoints; use an operator token."),
                "client_key_not_allowed",
            )
        if not user.is_staff:
            return self._refuse(_("Only staff may use operator endpoints."), "not_staff")
        if isinstance(request.auth, OperatorCredential):
            if request.method in permissions.SAFE_METHODS or request.auth.can_write:
                return True
            return self._refuse(_("This operator token may only read."), "read_only_token")
        return True  # a staff session (CSRF is enforced by SessionAuthentication)

    def _refuse(self, message: Any, code: str) -> bool:
        # Set on this instance only: DRF makes one permission object per request.
        self.message = message
        self.code = code
        return False
