"""The client endpoints: a user's own limits, usage, requests, keys and models.

Every query is scoped to request.user: another user's object is simply not found (404), so
the API never confirms that an id exists."""

from __future__ import annotations

import csv
import io
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import ApiKey
from api import serializers as s
from api.errors import Conflict, ServiceUnavailable, invalid
from api.me import me_payload
from api.pagination import NewestFirst, NewestRequestsFirst
from gateway.models import ServedModel
from quotas.models import UsageRecord
from quotas.request_policy import model_allowed
from quotas.services import (
    KeyPolicyError,
    create_own_api_key,
    effective_limits_for,
    revoke_own_api_key,
)
from telemetry.exports import BOM
from telemetry.usage import usage_csv_rows, usage_report
from tokenlimit.limiter import LimiterUnavailable

CLIENT = ["client"]
CSV_RESPONSE = OpenApiResponse(
    OpenApiTypes.STR, description=_("UTF-8 with a byte-order mark (Excel)")
)


class MeView(APIView):
    error_statuses = {"GET": ("503",)}

    @extend_schema(
        tags=CLIENT, responses=s.MeSerializer, summary=_("My limits and their live state")
    )
    def get(self, request: Request) -> Response:
        try:
            payload = me_payload(caller(request), request.auth)
        except LimiterUnavailable:
            raise ServiceUnavailable() from None
        return Response(s.MeSerializer(payload).data)


def caller(request: Request) -> User:
    """The authenticated user (IsClient has refused anonymous requests before any view runs)."""
    return cast(User, request.user)


def parse_query(serializer_class: type[serializers.Serializer[Any]], request: Request) -> Any:
    query = serializer_class(data=request.query_params)
    query.is_valid(raise_exception=True)
    return query.validated_data


def own_key_id(request: Request, key_id: int | None) -> int | None:
    """A key id the client named, if it is one of theirs; another user's is not found."""
    if key_id is not None and not ApiKey.objects.filter(pk=key_id, user=caller(request)).exists():
        raise exceptions.NotFound()
    return key_id


class UsageQuery(s.UsageQuerySerializer):
    format = serializers.ChoiceField(choices=["json", "csv"], default="json")


class UsageView(APIView):
    filter_serializer = UsageQuery
    error_statuses = {"GET": ("404",)}  # `key` names another user's key

    @extend_schema(
        tags=CLIENT,
        summary=_("My usage: totals and a series by minute, hour or day"),
        parameters=[UsageQuery],
        responses={
            (200, "application/json"): s.UsageSerializer,
            (200, "text/csv"): CSV_RESPONSE,
        },
    )
    def get(self, request: Request) -> Response | HttpResponse:
        query = parse_query(UsageQuery, request)
        return usage_response(
            query, user_id=request.user.pk, key_id=own_key_id(request, query.get("key"))
        )


def usage_response(
    query: dict[str, Any], *, user_id: int | None, key_id: int | None
) -> Response | HttpResponse:
    try:
        report = usage_report(
            user_id=user_id,
            period=query["period"],
            start=query["start"],
            end=query["end"],
            model=query.get("model"),
            api_key_id=key_id,
        )
    except ValueError as exc:
        raise exceptions.ValidationError({"start": [str(exc)]}) from None
    if query["format"] == "csv":
        return csv_response(usage_csv_rows(report), f"usage-{query['period']}.csv")
    return Response(s.UsageSerializer(report_payload(report)).data)


def report_payload(report: Any) -> dict[str, Any]:
    return {
        "period": report.period,
        "start": timezone.localtime(report.start),
        "end": timezone.localtime(report.end),
        "time_zone": settings.LIMITER_TIME_ZONE,
        "totals": report.totals,
        "by_model": [{"model": model, **vars_of(totals)} for model, totals in report.by_model],
        "series": [
            {**vars_of(bucket), "start": timezone.localtime(bucket.start)}
            for bucket in report.series
        ],
    }


def vars_of(figures: Any) -> dict[str, Any]:
    return {field: getattr(figures, field) for field in s.FIGURES}


def csv_response(rows: Any, filename: str) -> HttpResponse:
    # Excel opens UTF-8 as such only with a byte-order mark (Korean usernames and models).
    buffer = io.StringIO()
    buffer.write(BOM)
    csv.writer(buffer).writerows(rows)
    response = HttpResponse(buffer.getvalue(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


class RequestListView(generics.ListAPIView[UsageRecord]):
    serializer_class = s.RequestSerializer
    pagination_class = NewestRequestsFirst
    filter_serializer = s.RequestQuerySerializer
    error_statuses = {"GET": ("404",)}  # `key` names another user's key

    @extend_schema(
        tags=CLIENT, summary=_("My requests (the ledger)"), parameters=[s.RequestQuerySerializer]
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    def get_queryset(self) -> QuerySet[UsageRecord]:
        query = parse_query(s.RequestQuerySerializer, self.request)
        own_key_id(self.request, query.get("key"))
        return filter_requests(
            UsageRecord.objects.filter(user=caller(self.request)), query
        ).select_related("api_key")


def filter_requests(rows: QuerySet[UsageRecord], query: dict[str, Any]) -> QuerySet[UsageRecord]:
    status = query.get("status")
    if status == "ok":
        rows = rows.filter(status_code__lt=400)
    elif status == "rate_limited":
        rows = rows.filter(status_code=429)
    elif status == "error":
        rows = rows.filter(status_code__gte=400).exclude(status_code=429)
    if "status_code" in query:
        rows = rows.filter(status_code=query["status_code"])
    if "model" in query:
        rows = rows.filter(model=query["model"])
    if "key" in query:
        rows = rows.filter(api_key_id=query["key"])
    if "since" in query:
        rows = rows.filter(started_at__gte=query["since"])
    if "until" in query:
        rows = rows.filter(started_at__lt=query["until"])
    return rows


class KeyListView(generics.ListCreateAPIView[ApiKey]):
    serializer_class = s.KeySerializer
    pagination_class = NewestFirst
    error_statuses = {"POST": ("409",)}

    def get_queryset(self) -> QuerySet[ApiKey]:
        return ApiKey.objects.filter(user=caller(self.request))

    @extend_schema(tags=CLIENT, summary=_("My API keys"))
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        tags=CLIENT,
        summary=_("Create an API key (the raw key is in this response only)"),
        request=s.KeyCreateSerializer,
        responses={201: s.CreatedKeySerializer},
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = s.KeyCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            key, raw = create_own_api_key(caller(request), **data.validated_data)
        except KeyPolicyError as exc:
            raise policy_refusal(exc) from None
        except DjangoValidationError as exc:  # e.g. the expiry passed since it was checked
            raise invalid(exc) from None
        # The raw key goes out in this response only: it is not stored anywhere to show again.
        return Response({**s.KeySerializer(key).data, "key": raw}, status=201)


def policy_refusal(exc: KeyPolicyError) -> exceptions.APIException:
    """Too many keys is a conflict with what the user holds (409); self-service switched off by
    the plan, or a deactivated account, is a refusal (403)."""
    if exc.code == KeyPolicyError.TOO_MANY_KEYS:
        return Conflict(str(exc), exc.code)
    return exceptions.PermissionDenied(str(exc), exc.code)


class KeyDetailView(generics.RetrieveAPIView[ApiKey]):
    serializer_class = s.KeySerializer

    def get_queryset(self) -> QuerySet[ApiKey]:
        return ApiKey.objects.filter(user=caller(self.request))

    @extend_schema(tags=CLIENT, summary=_("One of my API keys"))
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class KeyRevokeView(APIView):
    @extend_schema(
        tags=CLIENT, summary=_("Revoke one of my API keys"), request=None, responses=s.KeySerializer
    )
    def post(self, request: Request, pk: int) -> Response:
        try:
            found = revoke_own_api_key(caller(request), pk)
        except KeyPolicyError as exc:
            raise policy_refusal(exc) from None
        if not found:
            raise exceptions.NotFound()
        key = get_object_or_404(ApiKey, pk=pk, user=caller(request))
        return Response(s.KeySerializer(key).data)


class ModelListView(APIView):
    @extend_schema(
        tags=CLIENT, summary=_("The models I may use"), responses=s.ModelSerializer(many=True)
    )
    def get(self, request: Request) -> Response:
        allowed = effective_limits_for(caller(request)).allowed_models
        models = ServedModel.objects.filter(is_active=True).order_by("name")
        cards = [card for model in models if (card := model_card(model, allowed)) is not None]
        return Response(s.ModelSerializer(cards, many=True).data)


def model_card(model: ServedModel, allowed: tuple[str, ...]) -> dict[str, Any] | None:
    """The model as this user may use it (None: not at all). Plans allow models by name or
    alias, adapters as "model:adapter" or "model:*", the same rules as the gateway's."""
    names = [model.name, *(model.aliases or [])]
    adapters = [a for a in model.lora_adapters or [] if model_allowed(allowed, names, a)]
    if not adapters and not model_allowed(allowed, names, None):
        return None
    return {
        "name": model.name,
        "aliases": list(model.aliases or []),
        "context_length": model.context_length,
        "lora_adapters": adapters,
        "accepts_media": model.accepts_media,
        "description": model.description,
    }


@extend_schema(exclude=True)
class NotFoundView(APIView):
    """Unknown paths under /api/v1/, for every method, before any authentication."""

    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []
    throttle_classes: list[Any] = []

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        raise exceptions.NotFound()
