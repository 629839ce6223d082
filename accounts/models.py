"""API keys. A key is stored only as its SHA-256 hash and a short visible prefix."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


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

    class Meta:
        verbose_name = _("API key")
        verbose_name_plural = _("API keys")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"
