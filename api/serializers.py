"""What clients read and send: the shapes of /api/v1/me, usage, requests, keys and models."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _
from rest_framework import serializers

from accounts.models import ApiKey
from quotas.models import UsageRecord
from telemetry.rollups import PERIODS
from telemetry.usage import UsageTotals

Serializer = serializers.Serializer[Any]

# Times a client may send: far enough either way for any real query or expiry; outside, a
# datetime would not even render as RFC 3339 (Seoul's pre-1908 local mean time is +08:27:52).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2999, 12, 31, tzinfo=UTC)


def printable(value: str) -> str:
    """A name shown in lists, logs and CSV files: no control characters or line breaks."""
    if not value.isprintable() or value != value.strip():
        raise serializers.ValidationError(
            gettext("Use printable characters, without leading or trailing spaces.")
        )
    return value


class Moment(serializers.DateTimeField):
    """An ISO 8601 date-time between 1970 and 2999; naive ones are read in Asia/Seoul."""

    def to_internal_value(self, value: Any) -> datetime:
        moment = super().to_internal_value(value)
        if not EARLIEST <= moment <= LATEST:
            raise serializers.ValidationError(gettext("Enter a time between 1970 and 2999."))
        return moment


# --- Limits and their live windows (/me) ---------------------------------------------------------


class LimitsSerializer(Serializer):
    requests_per_minute = serializers.IntegerField(help_text=_("0 = no limit"))
    tokens_per_minute = serializers.IntegerField()
    tokens_per_hour = serializers.IntegerField()
    tokens_per_day = serializers.IntegerField(help_text=_("Per calendar day in Asia/Seoul."))
    cooldown_minutes = serializers.IntegerField()
    max_parallel_requests = serializers.IntegerField()
    allowed_models = serializers.ListField(
        child=serializers.CharField(), help_text=_("Empty: every served model.")
    )


class WindowSerializer(Serializer):
    window = serializers.ChoiceField(
        choices=["requests_per_minute", "tokens_per_minute", "tokens_per_hour", "tokens_per_day"]
    )
    limit = serializers.IntegerField(help_text=_("0 = no limit"))
    used = serializers.IntegerField(help_text=_("Including reservations of running requests."))
    remaining = serializers.IntegerField()
    reset_seconds = serializers.FloatField(
        help_text=_("Seconds until the window has room again (x-ratelimit-reset-*).")
    )
    resets_at = serializers.DateTimeField(help_text=_("The same moment, in Asia/Seoul."))


class ScopeStateSerializer(Serializer):
    scope = serializers.ChoiceField(choices=["user", "key"])
    key_id = serializers.IntegerField(allow_null=True)
    key_prefix = serializers.CharField(allow_null=True)
    limits = LimitsSerializer()
    windows = WindowSerializer(many=True)
    in_flight = serializers.IntegerField()
    max_parallel_requests = serializers.IntegerField()
    cooldown_remaining_seconds = serializers.FloatField()
    cooldown_ends_at = serializers.DateTimeField(allow_null=True)


class UserSummarySerializer(Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.CharField(allow_blank=True)
    is_staff = serializers.BooleanField()


class PlanSummarySerializer(Serializer):
    name = serializers.CharField()
    description = serializers.CharField(allow_blank=True)
    self_service_keys = serializers.BooleanField()
    max_keys_per_user = serializers.IntegerField(help_text=_("0 = no limit"))


class CredentialSerializer(Serializer):
    kind = serializers.ChoiceField(choices=["api_key", "session"])
    key_id = serializers.IntegerField(allow_null=True)
    key_prefix = serializers.CharField(allow_null=True)


class MeSerializer(Serializer):
    user = UserSummarySerializer()
    plan = PlanSummarySerializer()
    credential = CredentialSerializer()
    limits = LimitsSerializer(help_text=_("The user's limits: the plan with any overrides."))
    scopes = ScopeStateSerializer(
        many=True,
        help_text=_(
            "The live state of every limit that applies: the user's, and each key's own "
            "tighter limits (the key in use, or with a session every active key that has some)."
        ),
    )
    time_zone = serializers.CharField()
    checked_at = serializers.DateTimeField()


# --- Usage ----------------------------------------------------------------------------------------

PERIOD_CHOICES = list(PERIODS)


class UsageQuerySerializer(Serializer):
    period = serializers.ChoiceField(choices=PERIOD_CHOICES, default="hour")
    start = Moment(
        required=False, help_text=_("Default: 24 buckets back (minute, hour) or 30 days (day).")
    )
    end = Moment(required=False, help_text=_("Default: now."))
    model = serializers.CharField(required=False, max_length=200)
    key = serializers.IntegerField(required=False, min_value=1, help_text=_("An API key id."))

    DEFAULT_SPAN = {
        "minute": timedelta(hours=1),
        "hour": timedelta(hours=24),
        "day": timedelta(days=30),
    }

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        end = attrs.get("end") or timezone.now()
        start = attrs.get("start") or end - self.DEFAULT_SPAN[attrs["period"]]
        if start >= end:
            raise serializers.ValidationError({"start": gettext("start must be before end.")})
        return {**attrs, "start": start, "end": end}


class UsageFigures(Serializer):
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    rate_limited = serializers.IntegerField(help_text=_("Requests refused with 429."))
    # Shadows Serializer.errors on the class only: DRF moves declared fields into `fields`.
    errors = serializers.IntegerField(  # type: ignore[assignment]
        help_text=_("Other failed requests (status >= 400).")
    )


# The figures of a usage total, in the report's order.
FIGURES = tuple(figure.name for figure in dataclasses.fields(UsageTotals))


class UsageBucketSerializer(UsageFigures):
    start = serializers.DateTimeField()


class ModelUsageSerializer(UsageFigures):
    model = serializers.CharField(allow_blank=True, help_text=_('"" for refused requests.'))


class UsageSerializer(Serializer):
    period = serializers.ChoiceField(choices=PERIOD_CHOICES)
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    time_zone = serializers.CharField()
    totals = UsageFigures()
    by_model = ModelUsageSerializer(many=True)
    series = UsageBucketSerializer(many=True, help_text=_("Buckets with usage only, oldest first."))


# --- Requests (the ledger) -----------------------------------------------------------------------


class RequestQuerySerializer(Serializer):
    status = serializers.ChoiceField(choices=["ok", "error", "rate_limited"], required=False)
    status_code = serializers.IntegerField(required=False, min_value=100, max_value=599)
    model = serializers.CharField(required=False, max_length=200)
    key = serializers.IntegerField(required=False, min_value=1)
    since = Moment(required=False)
    until = Moment(required=False)


class RequestSerializer(serializers.ModelSerializer[UsageRecord]):
    key_id = serializers.IntegerField(source="api_key_id", allow_null=True)
    key_prefix = serializers.SerializerMethodField()
    total_tokens = serializers.IntegerField()
    refused_by = serializers.SerializerMethodField(
        help_text=_("For a 429: the limit that refused it (requests, tokens, tokens_per_day, …).")
    )
    latency_ms = serializers.SerializerMethodField()
    # Declared rather than derived from the model, whose bounds depend on the database backend.
    status_code = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()

    class Meta:
        model = UsageRecord
        fields = [
            "request_id",
            "started_at",
            "finished_at",
            "model",
            "endpoint",
            "key_id",
            "key_prefix",
            "status_code",
            "error_type",
            "refused_by",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "total_tokens",
            "usage_source",
            "streamed",
            "client_disconnected",
            "latency_ms",
            "time_to_first_token_ms",
        ]

    def get_key_prefix(self, row: UsageRecord) -> str | None:
        return row.api_key.prefix if row.api_key_id and row.api_key else None

    def get_refused_by(self, row: UsageRecord) -> str | None:
        return row.error_type or None if row.status_code == 429 else None

    def get_latency_ms(self, row: UsageRecord) -> float:
        return round((row.finished_at - row.started_at).total_seconds() * 1000, 1)


# --- Keys ----------------------------------------------------------------------------------------


class KeySerializer(serializers.ModelSerializer[ApiKey]):
    state = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "prefix",
            "created_at",
            "last_used_at",
            "expires_at",
            "revoked_at",
            "state",
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_hour",
            "tokens_per_day",
            "max_parallel_requests",
        ]
        read_only_fields = fields

    def get_state(self, key: ApiKey) -> str:
        return key.state


class KeyCreateSerializer(Serializer):
    name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")

    def validate_name(self, value: str) -> str:
        return printable(value)

    expires_at = Moment(required=False, allow_null=True, default=None)

    def validate_expires_at(self, value: Any) -> Any:
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError(gettext("The expiry must be in the future."))
        return value


class CreatedKeySerializer(KeySerializer):
    key = serializers.CharField(
        help_text=_("The raw API key: shown in this response only, never again.")
    )

    class Meta(KeySerializer.Meta):
        fields = [*KeySerializer.Meta.fields, "key"]
        read_only_fields = fields


# --- Models --------------------------------------------------------------------------------------


class ModelSerializer(Serializer):
    name = serializers.CharField()
    aliases = serializers.ListField(child=serializers.CharField())
    context_length = serializers.IntegerField()
    lora_adapters = serializers.ListField(
        child=serializers.CharField(), help_text=_("Adapters this user may ask for.")
    )
    accepts_media = serializers.BooleanField()
    description = serializers.CharField(allow_blank=True)
