"""Plans, per-user overrides and the usage ledger."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, URLValidator
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from quotas.request_policy import validate_extra_fields
from tokenlimit.limiter import LIMIT_FIELDS, Limits

# A served model's name (200) and ":" and a LoRA adapter's name (64), with room to spare.
MODEL_NAME_MAX = 300


def validate_model_names(names: object) -> None:
    """Model-field validator for allowed_models: the gateway reads it as a list of names, so
    anything else would break every request of the plan's users."""
    if not isinstance(names, list) or not all(
        isinstance(name, str) and 0 < len(name) <= MODEL_NAME_MAX for name in names
    ):
        raise ValidationError(gettext('Enter a list of model names, e.g. ["korean-qwen"].'))


class Plan(models.Model):
    name = models.CharField(_("name"), max_length=100, unique=True)
    description = models.TextField(_("description"), blank=True)
    requests_per_minute = models.PositiveIntegerField(_("requests per minute"), default=40)
    tokens_per_minute = models.PositiveIntegerField(_("tokens per minute"), default=8000)
    tokens_per_hour = models.PositiveBigIntegerField(_("tokens per hour"), default=500_000)
    tokens_per_day = models.PositiveBigIntegerField(_("tokens per day"), default=1_000_000)
    cooldown_minutes = models.PositiveIntegerField(_("cooldown minutes"), default=2)
    max_parallel_requests = models.PositiveIntegerField(_("max parallel requests"), default=8)
    allowed_models = models.JSONField(
        _("allowed models"),
        default=list,
        blank=True,
        validators=[validate_model_names],
        help_text=_(
            "Model names or aliases this plan may use; empty allows every model and adapter. "
            'A LoRA adapter is allowed by "model:adapter", all of a model\'s by "model:*".'
        ),
    )
    extra_request_fields = models.JSONField(
        _("extra request fields"),
        default=list,
        blank=True,
        validators=[validate_extra_fields],
        help_text=_(
            "SGLang request fields this plan's clients may send beyond the standard ones, "
            'e.g. ["ignore_eos", "return_hidden_states"]. Fields the gateway sets itself '
            "(rid, priority, cache_salt, input_ids, custom_logit_processor, …) cannot be added."
        ),
    )
    priority = models.IntegerField(
        _("priority"),
        null=True,
        blank=True,
        help_text=_(
            "Sent upstream as SGLang's request priority (the server needs "
            "--enable-priority-scheduling); blank sends none."
        ),
    )
    fair_share_weight = models.PositiveSmallIntegerField(
        _("fair share weight"),
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(1000)],
        help_text=_(
            "When a model's server is full, the places that free go to waiting requests in "
            "proportion to this weight: a plan with 3 gets three for each one of a plan with 1."
        ),
    )
    max_queue_seconds = models.FloatField(
        _("longest wait for a place (s)"),
        default=30.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(3600.0)],
        help_text=_(
            "How long a request may wait in the gateway's queue when the model's server is "
            "full; then it is refused with 429 and Retry-After. 0: never wait."
        ),
    )
    isolate_prefix_cache = models.BooleanField(
        _("isolate prefix cache"),
        default=False,
        help_text=_(
            "Send a per-user cache_salt so that one user's prompts never hit prefix-cache "
            "entries made by another. Costs the hits users would share (a common system prompt)."
        ),
    )
    self_service_keys = models.BooleanField(
        _("self-service API keys"),
        default=True,
        help_text=_("End users may create and revoke their own API keys."),
    )
    max_keys_per_user = models.PositiveIntegerField(
        _("max keys per user"),
        default=5,
        help_text=_(
            "Most active keys a user may hold when creating their own; 0 = no limit. Keys an "
            "operator creates are not limited."
        ),
    )

    class Meta:
        verbose_name = _("plan")
        verbose_name_plural = _("plans")
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class UserQuota(models.Model):
    """A user's plan and optional per-user overrides of any plan field (blank = the plan's)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="quota",
        verbose_name=_("user"),
    )
    plan = models.ForeignKey(
        Plan, on_delete=models.PROTECT, related_name="quotas", verbose_name=_("plan")
    )
    description = models.TextField(_("description"), blank=True)
    requests_per_minute = models.PositiveIntegerField(
        _("requests per minute"), null=True, blank=True
    )
    tokens_per_minute = models.PositiveIntegerField(_("tokens per minute"), null=True, blank=True)
    tokens_per_hour = models.PositiveBigIntegerField(_("tokens per hour"), null=True, blank=True)
    tokens_per_day = models.PositiveBigIntegerField(_("tokens per day"), null=True, blank=True)
    cooldown_minutes = models.PositiveIntegerField(_("cooldown minutes"), null=True, blank=True)
    max_parallel_requests = models.PositiveIntegerField(
        _("max parallel requests"), null=True, blank=True
    )
    allowed_models = models.JSONField(
        _("allowed models"), null=True, blank=True, validators=[validate_model_names]
    )

    class Meta:
        verbose_name = _("user quota")
        verbose_name_plural = _("user quotas")

    def __str__(self) -> str:
        return f"{self.user} · {self.plan}"

    def effective_limits(self) -> Limits:
        values = {
            field: getattr(self, field)
            if getattr(self, field) is not None
            else getattr(self.plan, field)
            for field in LIMIT_FIELDS
        }
        models_ = (
            self.allowed_models if self.allowed_models is not None else self.plan.allowed_models
        )
        return Limits(**values, allowed_models=tuple(models_ or ()))


class UsageSource(models.TextChoices):
    UPSTREAM = "upstream", _("reported by the upstream")
    GATEWAY = "gateway", _("counted by the gateway")
    NONE = "none", _("nothing generated")
    # The gateway died mid-request: prompt and the output its last checkpoint saw.
    CHECKPOINT = "checkpoint", _("last checkpoint (gateway interrupted)")


class UsageRecord(models.Model):
    """One row per request that reached the gateway with a valid key; written in batches."""

    request_id = models.CharField(_("request id"), max_length=64, unique=True)
    # No database constraint: the ledger is append-only history, written in batches after the
    # fact; deleting a user or key must neither cascade into billing data nor make a pending
    # batch fail on a foreign key.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        related_name="usage_records",
        verbose_name=_("user"),
    )
    api_key = models.ForeignKey(
        "accounts.ApiKey",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        related_name="usage_records",
        verbose_name=_("API key"),
    )
    model = models.CharField(_("model"), max_length=200)
    endpoint = models.CharField(_("endpoint"), max_length=40)
    prompt_tokens = models.PositiveIntegerField(_("prompt tokens"), default=0)
    completion_tokens = models.PositiveIntegerField(_("completion tokens"), default=0)
    cached_tokens = models.PositiveIntegerField(_("cached tokens"), default=0)
    estimated_prompt_tokens = models.PositiveIntegerField(_("gateway's prompt count"), default=0)
    usage_source = models.CharField(
        _("usage source"), max_length=10, choices=UsageSource.choices, default=UsageSource.UPSTREAM
    )
    status_code = models.PositiveSmallIntegerField(_("HTTP status"))
    error_type = models.CharField(_("error type"), max_length=60, blank=True)
    streamed = models.BooleanField(_("streamed"), default=False)
    client_disconnected = models.BooleanField(_("client disconnected"), default=False)
    started_at = models.DateTimeField(_("started"))
    finished_at = models.DateTimeField(_("finished"))
    upstream_latency_ms = models.FloatField(_("upstream latency (ms)"), null=True, blank=True)
    time_to_first_token_ms = models.FloatField(_("time to first token (ms)"), null=True, blank=True)
    # A model may have several servers (gateway/routing.py): which one answered ("": none).
    upstream = models.CharField(_("upstream"), max_length=300, blank=True, default="")

    class Meta:
        verbose_name = _("usage record")
        verbose_name_plural = _("usage records")
        indexes = [
            models.Index(fields=["started_at"]),
            models.Index(fields=["user", "started_at"]),
        ]

    def __str__(self) -> str:
        return self.request_id

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class LedgerDeadLetter(models.Model):
    """A usage event the ledger could not write, kept with its error instead of blocking the rest.

    Written by quotas.services.record_usage_rows, replayed by replay_dead_letters (an admin
    action) once the cause is fixed.
    """

    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    source = models.CharField(_("source"), max_length=20)
    request_id = models.CharField(_("request id"), max_length=64, blank=True, db_index=True)
    raw = models.TextField(_("raw event"))
    error = models.TextField(_("error"))
    replayed_at = models.DateTimeField(_("replayed"), null=True, blank=True)
    replayed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("replayed by"),
    )

    class Meta:
        verbose_name = _("ledger dead letter")
        verbose_name_plural = _("ledger dead letters")
        indexes = [models.Index(fields=["replayed_at", "created_at"])]

    def __str__(self) -> str:
        return self.request_id or f"#{self.pk}"


# --- Quota alerts (quotas/alerts.py sets them; telemetry/alerts.py checks and sends) -------------

WEBHOOK_URL_MAX = 500


def validate_webhook_url(url: str) -> None:
    """An alert webhook: http(s) only, at most WEBHOOK_URL_MAX characters, and no user:password@
    part (a credential in a URL ends up in logs and in the audit trail)."""
    if not url:
        return
    if len(url) > WEBHOOK_URL_MAX:
        raise ValidationError(
            gettext("Enter a URL of at most %(max)d characters.") % {"max": WEBHOOK_URL_MAX}
        )
    URLValidator(
        schemes=["http", "https"],
        message=gettext("Enter a web address that starts with http:// or https://."),
    )(url)
    if "@" in urlsplit(url).netloc:
        raise ValidationError(
            gettext("The address must not contain a user name or password (user:password@).")
        )


class AlertWindow(models.TextChoices):
    """The windows a user may be alerted about: the ones that run out for hours, not seconds."""

    TOKENS_PER_DAY = "tokens_per_day", _("daily token quota")
    TOKENS_PER_HOUR = "tokens_per_hour", _("tokens per hour")


class QuotaAlert(models.Model):
    """One threshold of one window for one user: "tell me at 80 % of my daily tokens".

    Turned off rather than deleted (`enabled`): its deliveries stay in the user's history, and
    turning it off and on again within a period does not notify a second time.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="quota_alerts",
        verbose_name=_("user"),
    )
    window = models.CharField(_("window"), max_length=20, choices=AlertWindow.choices)
    threshold_percent = models.PositiveSmallIntegerField(
        _("threshold (%)"), validators=[MinValueValidator(1), MaxValueValidator(100)]
    )
    enabled = models.BooleanField(_("enabled"), default=True)
    created_at = models.DateTimeField(_("created"), default=timezone.now)

    class Meta:
        verbose_name = _("quota alert")
        verbose_name_plural = _("quota alerts")
        ordering = ["window", "threshold_percent"]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "window", "threshold_percent"], name="quotas_alert_unique"
            ),
            models.CheckConstraint(
                condition=models.Q(threshold_percent__gte=1, threshold_percent__lte=100),
                name="quotas_alert_threshold_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} · {self.window} · {self.threshold_percent}%"


class QuotaAlertSettings(models.Model):
    """How a user's alerts reach them (no row: by email, no webhook)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="quota_alert_settings",
        verbose_name=_("user"),
    )
    email_enabled = models.BooleanField(_("send email"), default=True)
    webhook_url = models.CharField(
        _("webhook URL"),
        max_length=WEBHOOK_URL_MAX,
        blank=True,
        validators=[validate_webhook_url],
    )
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("quota alert settings")
        verbose_name_plural = _("quota alert settings")

    def __str__(self) -> str:
        return str(self.user_id)


class DeliveryStatus(models.TextChoices):
    # Claimed (the row exists) but not yet reported back: a check that died while sending.
    PENDING = "pending", _("sending")
    SENT = "sent", _("sent")
    FAILED = "failed", _("failed")


DELIVERY_ERROR_MAX = 500


class QuotaAlertDelivery(models.Model):
    """The one notification of an alert in one period (a day, or an hour for tokens per hour).

    The row is inserted before anything is sent, and (alert, period_start) is unique: of two
    checks racing, only the one whose insert went in sends. Never retried (telemetry/alerts.py).
    """

    alert = models.ForeignKey(
        QuotaAlert, on_delete=models.CASCADE, related_name="deliveries", verbose_name=_("alert")
    )
    period_start = models.DateTimeField(_("period start"))
    created_at = models.DateTimeField(_("created"), default=timezone.now)
    sent_at = models.DateTimeField(_("sent"), null=True, blank=True)
    # "email", "webhook" or "email+webhook": what was tried.
    channel = models.CharField(_("channel"), max_length=20)
    status = models.CharField(
        _("status"), max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    # The window as it was when the threshold was crossed.
    used = models.PositiveBigIntegerField(_("used"), default=0)
    limit = models.PositiveBigIntegerField(_("limit"), default=0)
    error = models.CharField(_("error"), max_length=DELIVERY_ERROR_MAX, blank=True)

    class Meta:
        verbose_name = _("quota alert delivery")
        verbose_name_plural = _("quota alert deliveries")
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["alert", "period_start"], name="quotas_alert_delivery_once"
            )
        ]
        # The gateways' readiness counts the last hour's failures (gateway/health.py).
        indexes = [models.Index(fields=["status", "created_at"], name="quotas_delivery_status_at")]

    def __str__(self) -> str:
        return f"{self.alert_id} @ {self.period_start:%Y-%m-%d %H:%M}"
