"""API keys and operator tokens (stored only as a SHA-256 hash and a short visible prefix) and
the audit log."""

from __future__ import annotations

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def active(self) -> ApiKeyQuerySet:
        """Keys that work now: not revoked, not expired (ApiKey.state == "active")."""
        return self.filter(revoked_at__isnull=True).exclude(expires_at__lte=timezone.now())


class ApiKey(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="api_keys",
        verbose_name=_("user"),
    )
    name = models.CharField(_("name"), max_length=100, blank=True)
    # Enough of the key to recognise it in a list ("sk-AbCd1234…"), never enough to use it.
    prefix = models.CharField(_("prefix"), max_length=16, db_index=True)
    key_hash = models.CharField(_("key hash"), max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(_("created"), default=timezone.now)
    last_used_at = models.DateTimeField(_("last used"), null=True, blank=True)
    expires_at = models.DateTimeField(_("expires"), null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True)
    # Optional limits for this key alone, tighter than its user's (blank = only the user's).
    requests_per_minute = models.PositiveIntegerField(
        _("requests per minute"), null=True, blank=True
    )
    tokens_per_minute = models.PositiveIntegerField(_("tokens per minute"), null=True, blank=True)
    tokens_per_hour = models.PositiveBigIntegerField(_("tokens per hour"), null=True, blank=True)
    tokens_per_day = models.PositiveBigIntegerField(_("tokens per day"), null=True, blank=True)
    max_parallel_requests = models.PositiveIntegerField(
        _("max parallel requests"), null=True, blank=True
    )
    # Marks keys that came from config/ (import_config), e.g. the well-known quick-start keys.
    imported = models.BooleanField(_("imported from configuration"), default=False)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = _("API key")
        verbose_name_plural = _("API keys")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @property
    def state(self) -> str:
        """ "revoked", "expired" or "active" (the key's own state; its user may be inactive)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"


class OperatorScope(models.TextChoices):
    READ = "read", _("read")
    # Write implies read: a script that changes things must see them too.
    WRITE = "write", _("read and write")


class OperatorToken(models.Model):
    """A credential for scripts that run the platform through the REST API, acting as one staff
    user. A separate kind from ApiKey (and "op-" rather than "sk-"), so that a client key can
    never manage the platform and an operator token never spends a client's quota."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="operator_tokens",
        verbose_name=_("user"),
        limit_choices_to={"is_staff": True, "is_active": True},
    )
    name = models.CharField(_("name"), max_length=100, blank=True)
    # Enough of the token to recognise it in a list ("op-AbCd1234…"), never enough to use it.
    prefix = models.CharField(_("prefix"), max_length=16, db_index=True)
    key_hash = models.CharField(_("token hash"), max_length=64, unique=True, editable=False)
    scope = models.CharField(
        _("scope"), max_length=8, choices=OperatorScope.choices, default=OperatorScope.READ
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now)
    last_used_at = models.DateTimeField(_("last used"), null=True, blank=True)
    expires_at = models.DateTimeField(_("expires"), null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True)

    class Meta:
        verbose_name = _("operator token")
        verbose_name_plural = _("operator tokens")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}…"

    def allows(self, scope: str) -> bool:
        """Whether the token may act in `scope` ("read" or "write"); write implies read."""
        if scope not in OperatorScope.values:
            return False
        return scope == OperatorScope.READ or self.scope == OperatorScope.WRITE


class AuditAction(models.TextChoices):
    KEY_CREATED = "key_created", _("API key created")
    KEY_CHANGED = "key_changed", _("API key changed")
    KEY_REVOKED = "key_revoked", _("API key revoked")
    QUOTA_CHANGED = "quota_changed", _("user quota changed")
    PLAN_CREATED = "plan_created", _("plan created")
    PLAN_CHANGED = "plan_changed", _("plan changed")
    PLAN_DELETED = "plan_deleted", _("plan deleted")
    MODEL_CREATED = "model_created", _("served model created")
    MODEL_CHANGED = "model_changed", _("served model changed")
    MODEL_DELETED = "model_deleted", _("served model deleted")
    USER_CREATED = "user_created", _("user created")
    USER_CHANGED = "user_changed", _("user changed")
    OPERATOR_TOKEN_CREATED = "operator_token_created", _("operator token created")
    OPERATOR_TOKEN_REVOKED = "operator_token_revoked", _("operator token revoked")
    QUOTA_ALERTS_CHANGED = "quota_alerts_changed", _("quota alerts changed")


class AuditEvent(models.Model):
    """Who changed what, and when: one row per change, written by the service that made it, in
    the same transaction (accounts/services.py: record_audit). Never edited afterwards."""

    created_at = models.DateTimeField(_("when"), default=timezone.now, editable=False)
    # None for the system or a management command; the label says which.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="audit_events",
        verbose_name=_("actor"),
    )
    # The actor as they were called then: survives a renamed or deleted user.
    actor_label = models.CharField(_("actor name"), max_length=150)
    action = models.CharField(_("action"), max_length=32, choices=AuditAction.choices)
    # What was changed, as "app_label.model" and primary key: one index serves a key's history
    # without a foreign key per kind of target (and an audit row outlives its target).
    target_type = models.CharField(_("target type"), max_length=100)
    target_id = models.BigIntegerField(_("target id"))
    # The target as it was called then (a key's prefix, a username, a plan name), so that the
    # list needs no join per kind of target.
    target_label = models.CharField(_("target"), max_length=200)
    # What changed: {field: {"old": …, "new": …}}, or a created key's facts. Never a raw key.
    details = models.JSONField(_("details"), default=dict, blank=True, encoder=DjangoJSONEncoder)

    class Meta:
        verbose_name = _("audit event")
        verbose_name_plural = _("audit events")
        ordering = ["-created_at"]
        indexes = [
            models.Index(
                fields=["target_type", "target_id", "created_at"], name="accounts_audit_target"
            ),
            models.Index(fields=["created_at"], name="accounts_audit_created"),
        ]

    def __str__(self) -> str:
        return f"{self.actor_label}: {self.get_action_display()} {self.target_label}"
