"""What operators read and send: users, quotas, plans, keys, served models, usage, upstreams."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth.models import User
from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _
from rest_framework import serializers

from api.serializers import (
    KeyCreateSerializer,
    KeySerializer,
    Moment,
    UsageFigures,
    UsageQuerySerializer,
    printable,
)
from gateway.models import ServedModel
from gateway.services import (
    EDITABLE_MODEL_FIELDS,
    MAX_KOREAN_FACTOR,
    MAX_LEARNT_OFFSET,
    MAX_REQUEST_TIMEOUT_SECONDS,
)
from quotas.models import Plan
from quotas.services import PLAN_FIELDS
from telemetry.models import SGLangSample
from telemetry.usage import TOP_BY

Serializer = serializers.Serializer[Any]

# PostgreSQL's integer and (with headroom for sums) bigint: declared here, since bounds derived
# from the models depend on the database backend, and a SQLite install would publish a
# different schema.
INTEGER = 2**31 - 1
BIGINT = 2**62


def optional_limit(*, minimum: int, maximum: int = INTEGER) -> serializers.IntegerField:
    return serializers.IntegerField(
        required=False, allow_null=True, min_value=minimum, max_value=maximum
    )


class OperatorUserSerializer(serializers.ModelSerializer[User]):
    plan = serializers.SerializerMethodField()
    # Not `format: email`: a user without an address has "".
    email = serializers.CharField(read_only=True)

    class Meta:
        model = User
        fields = [
            "id",
            "username",
            "email",
            "first_name",
            "last_name",
            "is_active",
            "is_staff",
            "date_joined",
            "last_login",
            "plan",
        ]
        read_only_fields = fields

    def get_plan(self, user: User) -> str | None:
        quota = getattr(user, "quota", None)
        return quota.plan.name if quota is not None else None


class UserCreateSerializer(Serializer):
    username = serializers.CharField(max_length=150)
    email = serializers.EmailField(required=False, allow_blank=True, default="")
    first_name = serializers.CharField(max_length=150, required=False, allow_blank=True, default="")
    last_name = serializers.CharField(max_length=150, required=False, allow_blank=True, default="")
    password = serializers.CharField(
        write_only=True, required=False, allow_null=True, default=None, max_length=256,
        help_text=_("Blank: the user cannot log in to the web pages (API keys still work)."),
    )  # fmt: skip
    is_staff = serializers.BooleanField(required=False, default=False)
    is_active = serializers.BooleanField(required=False, default=True)
    plan = serializers.SlugRelatedField(
        slug_field="name", queryset=Plan.objects.all(), required=False, allow_null=True,
        help_text=_("Put the new user on this plan (default: the default plan)."),
    )  # fmt: skip


class UserUpdateSerializer(Serializer):
    email = serializers.EmailField(required=False, allow_blank=True)
    first_name = serializers.CharField(max_length=150, required=False, allow_blank=True)
    last_name = serializers.CharField(max_length=150, required=False, allow_blank=True)
    password = serializers.CharField(write_only=True, required=False, max_length=256)
    is_staff = serializers.BooleanField(required=False)
    is_active = serializers.BooleanField(required=False)


class QuotaSerializer(Serializer):
    """A user's plan and overrides (null: the plan's value)."""

    plan = serializers.SlugRelatedField(slug_field="name", queryset=Plan.objects.all())
    description = serializers.CharField(required=False, allow_blank=True, max_length=10_000)
    requests_per_minute = optional_limit(minimum=0)
    tokens_per_minute = optional_limit(minimum=0)
    tokens_per_hour = optional_limit(minimum=0, maximum=BIGINT)
    tokens_per_day = optional_limit(minimum=0, maximum=BIGINT)
    cooldown_minutes = optional_limit(minimum=0)
    max_parallel_requests = optional_limit(minimum=0)
    allowed_models = serializers.ListField(
        child=serializers.CharField(max_length=300),
        required=False,
        allow_null=True,
        max_length=1000,
    )


class PlanSerializer(serializers.ModelSerializer[Plan]):
    class Meta:
        model = Plan
        fields = ["id", *PLAN_FIELDS]
        read_only_fields = ["id"]
        extra_kwargs = {
            **{
                field: {"max_value": INTEGER}
                for field in (
                    "requests_per_minute",
                    "tokens_per_minute",
                    "cooldown_minutes",
                    "max_parallel_requests",
                    "max_keys_per_user",
                )
            },
            "tokens_per_hour": {"max_value": BIGINT},
            "tokens_per_day": {"max_value": BIGINT},
            "priority": {"min_value": -INTEGER - 1, "max_value": INTEGER},
        }

    def validate_name(self, value: str) -> str:
        return printable(value)

    def validate_allowed_models(self, value: Any) -> list[str]:
        return _names(value)


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) and 0 < len(v) <= 300 and v.isprintable() for v in value
    ):
        raise serializers.ValidationError(gettext("Enter a list of names."))
    return value


class OperatorKeySerializer(KeySerializer):
    user = serializers.IntegerField(source="user_id", read_only=True)
    username = serializers.CharField(source="user.username", read_only=True)
    imported = serializers.BooleanField(read_only=True)

    class Meta(KeySerializer.Meta):
        fields = [*KeySerializer.Meta.fields, "user", "username", "imported"]
        read_only_fields = fields


# A key's own limits: at least 1 each (null: only the user's limit applies). A comment, not a
# docstring: the schema would give it to every request body built on this one.
class KeyLimitsSerializer(Serializer):
    requests_per_minute = optional_limit(minimum=1)
    tokens_per_minute = optional_limit(minimum=1)
    tokens_per_hour = optional_limit(minimum=1, maximum=BIGINT)
    tokens_per_day = optional_limit(minimum=1, maximum=BIGINT)
    max_parallel_requests = optional_limit(minimum=1)


class OperatorKeyCreateSerializer(KeyCreateSerializer, KeyLimitsSerializer):
    user = serializers.PrimaryKeyRelatedField(queryset=User.objects.all())


class OperatorKeyUpdateSerializer(KeyLimitsSerializer):
    name = serializers.CharField(max_length=100, required=False, allow_blank=True)

    def validate_name(self, value: str) -> str:
        return printable(value)

    expires_at = Moment(required=False, allow_null=True)


class CreatedOperatorKeySerializer(OperatorKeySerializer):
    key = serializers.CharField(help_text=_("The raw API key: shown in this response only."))

    class Meta(OperatorKeySerializer.Meta):
        fields = [*OperatorKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class ServedModelSerializer(serializers.ModelSerializer[ServedModel]):
    class Meta:
        model = ServedModel
        fields = ["id", *EDITABLE_MODEL_FIELDS]
        read_only_fields = ["id"]
        extra_kwargs = {
            # The bounds the service holds every way in to (gateway/services.py).
            "context_length": {"min_value": 1, "max_value": INTEGER},
            "korean_factor": {"min_value": 0.01, "max_value": MAX_KOREAN_FACTOR},
            "request_timeout_seconds": {"min_value": 0.1, "max_value": MAX_REQUEST_TIMEOUT_SECONDS},
            "prompt_token_offset": {
                "min_value": -MAX_LEARNT_OFFSET,
                "max_value": MAX_LEARNT_OFFSET,
            },
        }

    def validate_name(self, value: str) -> str:
        return printable(value)

    def validate_aliases(self, value: Any) -> list[str]:
        return _names(value)


class OperatorUsageQuerySerializer(UsageQuerySerializer):
    user = serializers.IntegerField(required=False, min_value=1, help_text=_("One user's usage."))
    format = serializers.ChoiceField(choices=["json", "csv"], default="json")


class TopQuerySerializer(Serializer):
    by = serializers.ChoiceField(choices=list(TOP_BY), default="tokens")
    start = Moment(required=False, help_text=_("Default: 24 hours ago."))
    end = Moment(required=False, help_text=_("Default: now."))
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, default=10)
    model = serializers.CharField(required=False, max_length=200)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        end = attrs.get("end") or timezone.now()
        start = attrs.get("start") or end - timedelta(hours=24)
        if start >= end:
            raise serializers.ValidationError({"start": gettext("start must be before end.")})
        return {**attrs, "start": start, "end": end}


class TopUserSerializer(UsageFigures):
    user_id = serializers.IntegerField(allow_null=True)
    username = serializers.CharField(allow_null=True)


class SampleSerializer(serializers.ModelSerializer[SGLangSample]):
    class Meta:
        model = SGLangSample
        fields = [
            "upstream_url",
            "scraped_at",
            "ok",
            "error",
            "model_name",
            "running_requests",
            "queued_requests",
            "kv_cache_usage",
            "prefix_cache_hit_rate",
            "generation_throughput",
            "requests_total",
            "aborted_requests_total",
            "load",
        ]
        read_only_fields = fields
