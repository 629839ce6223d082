"""Models the gateway serves: the upstream's model name, client-facing aliases, the tokenizer."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _


def normalize_upstream_url(url: str) -> str:
    """The server's root: "http://sglang:8000/v1/" → "http://sglang:8000". Operators paste the
    OpenAI base URL they know, which ends in /v1; the gateway adds /v1/… (and probes /health,
    /metrics) itself, so a kept /v1 made every request a 404 ("/v1/v1/chat/completions")."""
    root = url.strip().rstrip("/")
    if root.lower().endswith("/v1"):
        root = root[: -len("/v1")].rstrip("/")
    return root


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_adapter_names(names: object) -> None:
    if not isinstance(names, list) or not all(
        isinstance(name, str) and ADAPTER_NAME.fullmatch(name) for name in names
    ):
        raise ValidationError(
            gettext('Enter a list of adapter names (letters, digits, ".", "_", "-").')
        )


class ServedModel(models.Model):
    # The name SGLang serves (--served-model-name, else --model-path): sent upstream as is.
    name = models.CharField(_("served model name"), max_length=200, unique=True)
    aliases = models.JSONField(
        _("aliases"),
        default=list,
        blank=True,
        help_text=_("Other names clients may use, e.g. korean-qwen."),
    )
    # Not a URLField: service names such as http://sglang:8000 (Docker, Kubernetes) must pass.
    upstream_url = models.CharField(
        _("upstream URL"),
        max_length=300,
        blank=True,
        validators=[
            RegexValidator(
                r"^https?://[A-Za-z0-9._~-]+(:[0-9]{1,5})?(/[^\s]*)?$",
                _("Enter an http:// or https:// address, e.g. http://sglang:8000."),
            )
        ],
        help_text=_("Blank: the SGLANG_URL setting."),
    )
    tokenizer = models.CharField(
        _("tokenizer"),
        max_length=500,
        blank=True,
        help_text=_("A local path or model name; blank: the served model name."),
    )
    context_length = models.PositiveIntegerField(_("context length"), default=32768)
    # The original design's Hangul-weight override for the estimator; null = calibrated factors.
    korean_factor = models.FloatField(_("Korean factor"), null=True, blank=True)
    request_timeout_seconds = models.FloatField(_("request timeout (s)"), default=300.0)
    lora_adapters = models.JSONField(
        _("LoRA adapters"),
        default=list,
        blank=True,
        validators=[validate_adapter_names],
        help_text=_(
            'Adapter names the server has loaded (--lora-paths name=path), e.g. ["legal-ko"]. '
            'Clients ask for one as "model:adapter" or with lora_path; plans allow them.'
        ),
    )
    accepts_media = models.BooleanField(
        _("accepts images, video and audio"),
        default=False,
        help_text=_(
            "Forward image_url, video_url and audio_url content parts. The model server fetches "
            "http(s) URLs itself: only enable it for multimodal models on a host that cannot "
            "reach internal addresses."
        ),
    )
    is_active = models.BooleanField(_("active"), default=True)
    description = models.TextField(_("description"), blank=True)

    class Meta:
        verbose_name = _("served model")
        verbose_name_plural = _("served models")
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        self.upstream_url = normalize_upstream_url(self.upstream_url)
