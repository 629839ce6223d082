"""One error shape for the whole REST API, the gateway's (OpenAI's) shape plus field errors:

    {"error": {"message": "…", "type": "invalid_request_error", "code": "invalid",
               "param": "expires_at", "fields": {"expires_at": ["…"]}}}

Messages follow the request's language (Accept-Language, else Korean), through Django's
LocaleMiddleware and DRF's own translations.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions, serializers
from rest_framework.response import Response
from rest_framework.views import set_rollback

log = logging.getLogger(__name__)

# The `type` of an error by its HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    406: "invalid_request_error",
    409: "conflict_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
MAX_MESSAGE_CHARS = 2000


class Conflict(exceptions.APIException):
    status_code = 409
    default_detail = _("The request conflicts with the current state.")
    default_code = "conflict"


class ServiceUnavailable(exceptions.APIException):
    status_code = 503
    default_detail = _("The service is temporarily unavailable; please retry shortly.")
    default_code = "service_unavailable"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER: every error, including unexpected ones, as the JSON shape."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        view = context.get("view")
        log.exception("REST API: unhandled error in %s", view.__class__.__name__ if view else "?")
        set_rollback()
        return Response(
            error_payload(
                500, gettext("The server failed to handle this request."), "server_error"
            ),
            status=500,
        )
    headers: dict[str, str] = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = str(exc.auth_header)  # type: ignore[attr-defined]
    wait = getattr(exc, "wait", None) if isinstance(exc, exceptions.Throttled) else None
    if wait is not None:
        headers["Retry-After"] = str(max(math.ceil(wait), 1))
    set_rollback()
    status = exc.status_code
    if isinstance(exc, exceptions.ValidationError):
        return Response(_validation_payload(exc), status=status, headers=headers)
    code = exc.get_codes()
    return Response(
        error_payload(status, str(exc.detail), code if isinstance(code, str) else "error"),
        status=status,
        headers=headers,
    )


def invalid(exc: DjangoValidationError | ValueError) -> exceptions.ValidationError:
    """A service's refusal (Django's ValidationError by field, or a ValueError) as a 400."""
    if isinstance(exc, DjangoValidationError) and hasattr(exc, "error_dict"):
        return exceptions.ValidationError(exc.message_dict)
    messages = exc.messages if isinstance(exc, DjangoValidationError) else [str(exc)]
    return exceptions.ValidationError({"non_field_errors": messages})


def error_payload(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    fields: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "message": message[:MAX_MESSAGE_CHARS],
        "type": ERROR_TYPES.get(status, "invalid_request_error"),
        "code": code,
        "param": param,
    }
    if fields:
        error["fields"] = fields
    return {"error": error}


def _validation_payload(exc: exceptions.ValidationError) -> dict[str, Any]:
    fields = _flatten(exc.detail)
    codes = _first_code(exc.get_codes())
    param = next(iter(fields), None)
    messages = fields.get(param, []) if param is not None else []
    if param in (None, "non_field_errors"):
        message = messages[0] if messages else gettext("Invalid request.")
        param = None
    else:
        message = f"{param}: {messages[0]}" if messages else gettext("Invalid request.")
    return error_payload(400, message, codes or "invalid", param, fields)


def _flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """Field errors as {"field" or "field.sub" or "items.0": [messages]}."""
    if isinstance(detail, dict):
        out: dict[str, list[str]] = {}
        for name, value in detail.items():
            out.update(_flatten(value, f"{prefix}.{name}" if prefix else str(name)))
        return out
    if isinstance(detail, list) and any(isinstance(item, dict | list) for item in detail):
        out = {}
        for index, value in enumerate(detail):
            out.update(_flatten(value, f"{prefix}.{index}" if prefix else str(index)))
        return out
    items = detail if isinstance(detail, list) else [detail]
    return {prefix or "non_field_errors": [str(item) for item in items]}


def _first_code(codes: Any) -> str | None:
    if isinstance(codes, str):
        return codes
    if isinstance(codes, dict):
        for value in codes.values():
            found = _first_code(value)
            if found:
                return found
    if isinstance(codes, list):
        for value in codes:
            found = _first_code(value)
            if found:
                return found
    return None


class ErrorDetailSerializer(serializers.Serializer[Any]):
    """The documented error body (for the OpenAPI schema)."""

    message = serializers.CharField(help_text=_("What went wrong, in the request's language."))
    type = serializers.ChoiceField(choices=sorted(set(ERROR_TYPES.values())))
    code = serializers.CharField(help_text=_("A stable, machine-readable reason."))
    param = serializers.CharField(
        allow_null=True, help_text=_("The field the error is about, if one.")
    )
    # Shadows Serializer.fields on the class only: DRF moves declared fields into `fields`.
    fields = serializers.DictField(  # type: ignore[assignment]
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text=_("Every field error, by field name (validation errors only)."),
    )


class ErrorSerializer(serializers.Serializer[Any]):
    error = ErrorDetailSerializer()
