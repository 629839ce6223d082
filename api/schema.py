"""The OpenAPI schema: our authentication schemes, and the error responses on every operation
(so that a client generator, and Schemathesis in CI, know every status an endpoint may give)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema

from api.errors import ErrorSerializer


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "api.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A client API key (sk-…), the one the /v1/ endpoints take.",
        }


class OperatorTokenScheme(OpenApiAuthenticationExtension):
    target_class = "api.authentication.OperatorTokenAuthentication"
    name = "operatorToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An operator token (op-…) made in the admin; scope read or write.",
        }


# Every operation may answer these; writes and objects add their own (400, 404, 409).
COMMON_ERRORS = ("401", "403", "429", "500")


class ApiAutoSchema(AutoSchema):
    """Error responses on every operation; views add their own per method:
    `error_statuses = {"POST": ("409",)}`."""

    def get_auth(self) -> list[Any]:
        # Both bearer classes run on every view (so that the wrong kind of credential gets a
        # clear 403), but only one of them is a way in: client keys for client operations,
        # operator tokens for operator ones.
        refused = "apiKey" if "/operator/" in self.path else "operatorToken"
        return [auth for auth in super().get_auth() if refused not in auth]

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        statuses = list(COMMON_ERRORS)
        if self.method in ("POST", "PUT", "PATCH") or self._has_query_parameters():
            statuses.append("400")
        if "{" in self.path:
            statuses.append("404")
        statuses.extend(getattr(self.view, "error_statuses", {}).get(self.method, ()))
        for status in statuses:
            responses.setdefault(
                status,
                self._get_response_for_code(
                    ErrorSerializer, status, media_types=["application/json"], direction=direction
                ),
            )
        return responses

    def _has_query_parameters(self) -> bool:
        paginated = self._is_list_view() and getattr(self.view, "pagination_class", None)
        return bool(getattr(self.view, "filter_serializer", None) or paginated)
