"""Who is calling the REST API: a client key, an operator token, or a logged-in session.

Client keys (`sk-…`) are the ones the gateway takes; operator tokens (`op-…`) are a separate
kind of credential, so that a leaked client key can never manage the platform. Both come as
`Authorization: Bearer …`.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import User
from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from accounts.models import ApiKey, OperatorToken
from accounts.services import (
    OPERATOR_TOKEN_PREFIX,
    find_operator_token,
    hash_key,
    touch_operator_token,
)

# A bearer credential longer than any we issue is refused before it is hashed or looked up.
MAX_CREDENTIAL_CHARS = 200


@dataclass(frozen=True, slots=True)
class ClientKey:
    """request.auth for a client authenticated by an API key."""

    key: ApiKey


@dataclass(frozen=True, slots=True)
class OperatorCredential:
    """request.auth for an operator token: the token's scope bounds what it may do."""

    token: OperatorToken

    @property
    def can_write(self) -> bool:
        return self.token.scope == "write"


def bearer_credential(request: Request) -> str | None:
    """The bearer token of the request, or None when there is no bearer header."""
    try:
        parts = authentication.get_authorization_header(request).split()
    except UnicodeEncodeError:  # a header DRF cannot even encode as Latin-1
        raise exceptions.AuthenticationFailed(_("Malformed Authorization header.")) from None
    if not parts or parts[0].lower() != b"bearer":
        return None
    if len(parts) != 2 or len(parts[1]) > MAX_CREDENTIAL_CHARS:
        raise exceptions.AuthenticationFailed(_("Malformed Authorization header."))
    try:
        return parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise exceptions.AuthenticationFailed(_("Malformed Authorization header.")) from None


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer sk-…`: the key's user, with the key as request.auth."""

    def authenticate(self, request: Request) -> tuple[User, ClientKey] | None:
        raw = bearer_credential(request)
        if raw is None or raw.startswith(OPERATOR_TOKEN_PREFIX):
            return None
        key = ApiKey.objects.select_related("user").filter(key_hash=hash_key(raw)).first()
        if key is None or key.state != "active" or not key.user.is_active:
            # One message for every case: which of them it was is nobody's business.
            raise exceptions.AuthenticationFailed(_("Invalid, expired or revoked API key."))
        return key.user, ClientKey(key)

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (with this challenge) rather than 403 to an unauthenticated call.
        return 'Bearer realm="api"'


class OperatorTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer op-…`: the token's staff user, with the token as request.auth."""

    def authenticate(self, request: Request) -> tuple[User, OperatorCredential] | None:
        raw = bearer_credential(request)
        if raw is None or not raw.startswith(OPERATOR_TOKEN_PREFIX):
            return None
        token = find_operator_token(raw)
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid, expired or revoked operator token."))
        touch_operator_token(token)
        return token.user, OperatorCredential(token)

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
