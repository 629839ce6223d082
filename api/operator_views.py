"""The operator endpoints: run the platform from scripts. Every write goes through the same
service functions as the admin, with the caller as the audited actor."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import Max, Q, QuerySet
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import ApiKey
from accounts.services import (
    create_api_key,
    create_user,
    revoke_api_keys,
    update_api_key,
    update_user,
)
from api import operator_serializers as o
from api.authentication import OperatorCredential
from api.client_views import CSV_RESPONSE, parse_query, usage_response
from api.errors import Conflict, invalid
from api.pagination import ById, ByName, NewestFirst
from api.permissions import IsOperator
from api.serializers import UsageSerializer
from gateway.models import ServedModel
from gateway.services import delete_served_model, save_served_model
from quotas.models import Plan, UserQuota
from quotas.services import (
    PlanInUse,
    create_plan,
    default_plan,
    delete_plan,
    set_user_quota,
    update_plan,
)
from telemetry.models import SGLangSample
from telemetry.usage import top_users

OPERATOR = ["operator"]


def acting(request: Request) -> dict[str, Any]:
    """The audit's actor: the staff user, and which token they used if not their session."""
    label = None
    if isinstance(request.auth, OperatorCredential):
        label = f"{request.user.get_username()} (token {request.auth.token.prefix}…)"[:150]
    return {"actor": request.user, "actor_label": label}


class OperatorViewSet(viewsets.GenericViewSet):
    permission_classes = [IsOperator]


@extend_schema_view(
    list=extend_schema(
        tags=OPERATOR,
        summary=_("Users"),
        parameters=[
            OpenApiParameter("search", str, description=_("Part of the username or email address."))
        ],
    ),
    retrieve=extend_schema(tags=OPERATOR, summary=_("One user")),
    create=extend_schema(
        tags=OPERATOR,
        summary=_("Create a user"),
        request=o.UserCreateSerializer,
        responses={201: o.OperatorUserSerializer},
    ),
    partial_update=extend_schema(
        tags=OPERATOR,
        summary=_("Change a user (deactivate with is_active=false)"),
        request=o.UserUpdateSerializer,
    ),
)
class UserViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OperatorViewSet):
    serializer_class = o.OperatorUserSerializer
    pagination_class = ById
    http_method_names = ["get", "post", "patch"]

    def get_queryset(self) -> QuerySet[User]:
        users = User.objects.select_related("quota__plan")
        search = self.request.query_params.get("search", "").strip()[:150]
        if search and self.action == "list":
            users = users.filter(Q(username__icontains=search) | Q(email__icontains=search))
        return users

    def create(self, request: Request) -> Response:
        data = parse_body(o.UserCreateSerializer, request)
        plan = data.pop("plan", None)
        try:
            with transaction.atomic():  # a user is never left without their plan
                user = create_user(**acting(request), **data)
                set_user_quota(user, plan or default_plan(), **acting(request))
        except (DjangoValidationError, ValueError) as exc:
            raise invalid(exc) from None
        return Response(
            o.OperatorUserSerializer(self.get_queryset().get(pk=user.pk)).data, status=201
        )

    def partial_update(self, request: Request, pk: str) -> Response:
        user = self.get_object()
        data = parse_body(o.UserUpdateSerializer, request)
        try:
            update_user(user, **acting(request), **data)
        except (DjangoValidationError, ValueError) as exc:
            raise invalid(exc) from None
        return Response(o.OperatorUserSerializer(self.get_queryset().get(pk=user.pk)).data)


def parse_body(serializer_class: Any, request: Request, **kwargs: Any) -> dict[str, Any]:
    data = serializer_class(data=request.data, **kwargs)
    data.is_valid(raise_exception=True)
    return dict(data.validated_data)


class QuotaView(APIView):
    permission_classes = [IsOperator]

    @extend_schema(
        tags=OPERATOR, summary=_("A user's plan and overrides"), responses=o.QuotaSerializer
    )
    def get(self, request: Request, pk: int) -> Response:
        user = get_object_or_404(User, pk=pk)
        quota = UserQuota.objects.select_related("plan").filter(user=user).first()
        if quota is None:
            return Response(o.QuotaSerializer({"plan": default_plan()}).data)
        return Response(o.QuotaSerializer(quota).data)

    @extend_schema(
        tags=OPERATOR, summary=_("Set a user's plan and overrides"),
        request=o.QuotaSerializer, responses=o.QuotaSerializer,
    )  # fmt: skip
    def put(self, request: Request, pk: int) -> Response:
        user = get_object_or_404(User, pk=pk)
        data = parse_body(o.QuotaSerializer, request)
        plan = data.pop("plan")
        quota, _ = set_user_quota(user, plan, **acting(request), **data)
        return Response(o.QuotaSerializer(quota).data)


@extend_schema_view(
    list=extend_schema(tags=OPERATOR, summary=_("Plans")),
    retrieve=extend_schema(tags=OPERATOR, summary=_("One plan")),
    create=extend_schema(tags=OPERATOR, summary=_("Create a plan")),
    partial_update=extend_schema(tags=OPERATOR, summary=_("Change a plan")),
    destroy=extend_schema(
        tags=OPERATOR, summary=_("Delete a plan nobody is on"), responses={204: None}
    ),
)
class PlanViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OperatorViewSet):
    serializer_class = o.PlanSerializer
    pagination_class = ByName
    queryset = Plan.objects.all()
    http_method_names = ["get", "post", "patch", "delete"]
    error_statuses = {"DELETE": ("409",)}

    def create(self, request: Request) -> Response:
        data = parse_body(o.PlanSerializer, request)
        try:
            plan = create_plan(**acting(request), **data)
        except (DjangoValidationError, ValueError) as exc:
            raise invalid(exc) from None
        return Response(o.PlanSerializer(plan).data, status=201)

    def partial_update(self, request: Request, pk: str) -> Response:
        plan = self.get_object()
        data = parse_body(o.PlanSerializer, request, partial=True, instance=plan)
        try:
            update_plan(plan, **acting(request), **data)
        except (DjangoValidationError, ValueError) as exc:
            raise invalid(exc) from None
        return Response(o.PlanSerializer(plan).data)

    def destroy(self, request: Request, pk: str) -> Response:
        plan = self.get_object()
        try:
            delete_plan(plan, **acting(request))
        except PlanInUse as exc:
            raise Conflict(str(exc), "plan_in_use") from None
        return Response(status=204)


@extend_schema_view(
    list=extend_schema(
        tags=OPERATOR,
        summary=_("API keys of every user"),
        parameters=[OpenApiParameter("user", int, description=_("Only this user's keys."))],
    ),
    retrieve=extend_schema(tags=OPERATOR, summary=_("One API key")),
    create=extend_schema(
        tags=OPERATOR,
        summary=_("Create a key for a user (raw key shown once)"),
        request=o.OperatorKeyCreateSerializer,
        responses={201: o.CreatedOperatorKeySerializer},
    ),
    partial_update=extend_schema(
        tags=OPERATOR,
        summary=_("Change a key's name, expiry or limits"),
        request=o.OperatorKeyUpdateSerializer,
    ),
    revoke=extend_schema(tags=OPERATOR, summary=_("Revoke a key"), request=None),
)
class KeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OperatorViewSet):
    serializer_class = o.OperatorKeySerializer
    pagination_class = NewestFirst
    http_method_names = ["get", "post", "patch"]

    def get_queryset(self) -> QuerySet[ApiKey]:
        keys = ApiKey.objects.select_related("user")
        user = self.request.query_params.get("user")
        if user is not None and self.action == "list":
            if not user.isdigit() or len(user) > 18:
                raise exceptions.ValidationError({"user": [gettext("Enter a user id.")]})
            keys = keys.filter(user_id=int(user))
        return keys

    def create(self, request: Request) -> Response:
        data = parse_body(o.OperatorKeyCreateSerializer, request)
        user = data.pop("user")
        name, expires_at = data.pop("name"), data.pop("expires_at")
        with transaction.atomic():  # a key is never live without the limits it was made with
            key, raw = create_api_key(user, name=name, expires_at=expires_at, **acting(request))
            if any(value is not None for value in data.values()):
                update_api_key(key, name=name, expires_at=expires_at, **acting(request), **data)
        return Response({**o.OperatorKeySerializer(key).data, "key": raw}, status=201)

    def partial_update(self, request: Request, pk: str) -> Response:
        key = self.get_object()
        data = parse_body(o.OperatorKeyUpdateSerializer, request)
        wanted = {"name": key.name, "expires_at": key.expires_at, **data}
        update_api_key(key, **acting(request), **wanted)
        return Response(o.OperatorKeySerializer(key).data)

    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str) -> Response:
        key = self.get_object()
        revoke_api_keys([key], **acting(request))
        return Response(o.OperatorKeySerializer(self.get_queryset().get(pk=key.pk)).data)


@extend_schema_view(
    list=extend_schema(tags=OPERATOR, summary=_("Served models")),
    retrieve=extend_schema(tags=OPERATOR, summary=_("One served model")),
    create=extend_schema(tags=OPERATOR, summary=_("Add a served model")),
    partial_update=extend_schema(tags=OPERATOR, summary=_("Change a served model")),
    destroy=extend_schema(tags=OPERATOR, summary=_("Remove a served model")),
)
class ServedModelViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OperatorViewSet):
    serializer_class = o.ServedModelSerializer
    pagination_class = ByName
    queryset = ServedModel.objects.all()
    http_method_names = ["get", "post", "patch", "delete"]

    def create(self, request: Request) -> Response:
        data = parse_body(o.ServedModelSerializer, request)
        try:
            model, _ = save_served_model(model=None, **acting(request), **data)
        except (DjangoValidationError, ValueError) as exc:
            raise invalid(exc) from None
        return Response(o.ServedModelSerializer(model).data, status=201)

    def partial_update(self, request: Request, pk: str) -> Response:
        model = self.get_object()
        data = parse_body(o.ServedModelSerializer, request, partial=True, instance=model)
        try:
            model, _ = save_served_model(model=model, **acting(request), **data)
        except (DjangoValidationError, ValueError) as exc:
            raise invalid(exc) from None
        return Response(o.ServedModelSerializer(model).data)

    def destroy(self, request: Request, pk: str) -> Response:
        delete_served_model(self.get_object(), **acting(request))
        return Response(status=204)


class UsageView(APIView):
    permission_classes = [IsOperator]
    filter_serializer = o.OperatorUsageQuerySerializer

    @extend_schema(
        tags=OPERATOR,
        summary=_("Usage of every user, or one"),
        parameters=[o.OperatorUsageQuerySerializer],
        responses={
            (200, "application/json"): UsageSerializer,
            (200, "text/csv"): CSV_RESPONSE,
        },
    )
    def get(self, request: Request) -> Response | HttpResponse:
        query = parse_query(o.OperatorUsageQuerySerializer, request)
        return usage_response(query, user_id=query.get("user"), key_id=query.get("key"))


class TopUsersView(APIView):
    permission_classes = [IsOperator]
    filter_serializer = o.TopQuerySerializer

    @extend_schema(
        tags=OPERATOR, summary=_("Top users by tokens, requests or 429s in a period"),
        parameters=[o.TopQuerySerializer], responses=o.TopUserSerializer(many=True),
    )  # fmt: skip
    def get(self, request: Request) -> Response:
        query = parse_query(o.TopQuerySerializer, request)
        try:
            rows = top_users(**query)
        except ValueError as exc:
            raise exceptions.ValidationError({"start": [str(exc)]}) from None
        return Response(o.TopUserSerializer(rows, many=True).data)


class UpstreamView(APIView):
    permission_classes = [IsOperator]

    @extend_schema(
        tags=OPERATOR, summary=_("The latest sample of every upstream (SGLang's own numbers)"),
        responses=o.SampleSerializer(many=True),
    )  # fmt: skip
    def get(self, request: Request) -> Response:
        latest = SGLangSample.objects.values("upstream_url").annotate(last=Max("id")).values("last")
        samples = SGLangSample.objects.filter(id__in=latest).order_by("upstream_url")
        return Response(o.SampleSerializer(samples, many=True).data)
