"""Models the gateway serves: the upstream's model name, client-facing aliases, the tokenizer."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone
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


AUTO_KIND = "auto"
UPSTREAM_KINDS = [
    (AUTO_KIND, _("automatic")),
    ("sglang", "SGLang"),
    ("vllm", "vLLM"),
    ("llama.cpp", "llama.cpp"),
    ("openai", _("other OpenAI-compatible server")),
]

UPSTREAM_URL = r"^https?://[A-Za-z0-9._~-]+(:[0-9]{1,5})?(/[^\s]*)?$"
UPSTREAM_URL_MESSAGE = _("Enter an http:// or https:// address, e.g. http://sglang:8000.")


MAX_UPSTREAMS = 32


def validate_upstream_urls(urls: object) -> None:
    if (
        not isinstance(urls, list)
        or len(urls) > MAX_UPSTREAMS
        or not all(
            isinstance(url, str) and len(url) <= 300 and re.fullmatch(UPSTREAM_URL, url.strip())
            for url in urls
        )
    ):
        raise ValidationError(
            gettext(
                "Enter a list of at most %(count)d http:// or https:// addresses, e.g. "
                '["http://sglang-2:8000"].'
            )
            % {"count": MAX_UPSTREAMS}
        )


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
        validators=[RegexValidator(UPSTREAM_URL, UPSTREAM_URL_MESSAGE)],
        help_text=_("Blank: the SGLANG_URL setting."),
    )
    # Replicas of the same server (same model, same flags): the gateway routes among them all
    # (gateway/routing.py).
    more_upstream_urls = models.JSONField(
        _("more upstream URLs"),
        default=list,
        blank=True,
        validators=[validate_upstream_urls],
        help_text=_(
            'Other servers running the same model, e.g. ["http://sglang-2:8000"]. Requests go '
            "to the least loaded, a user's requests to the same server while it is not much "
            "busier (its prefix cache stays warm); a server that refuses connections or fails "
            "its health checks is left out until it recovers."
        ),
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
    max_concurrent_requests = models.PositiveIntegerField(
        _("places upstream"),
        default=0,
        help_text=_(
            "Requests the model's server runs at once, counted across every gateway (SGLang's "
            "--max-running-requests). When all are taken, new requests wait in the gateway's "
            "fair queue, ordered by the plans' weights. 0: no queue, every request goes "
            "straight through."
        ),
    )
    upstream_kind = models.CharField(
        _("upstream kind"),
        max_length=20,
        choices=UPSTREAM_KINDS,
        default=AUTO_KIND,
        help_text=_(
            "The server behind the upstream URL. It decides what the gateway probes for health, "
            "scrapes for metrics, and uses for tokenizing and aborting. Automatic: detected from "
            "the server's answers."
        ),
    )
    chat_template = models.TextField(
        _("chat template"),
        blank=True,
        help_text=_(
            "A Jinja chat template that replaces the tokenizer's own, exactly as the model server "
            "is started with (--chat-template). Blank: the tokenizer's template."
        ),
    )
    # Added to every exact prompt count once the operator accepts it (see TokenizerCheck): a
    # known constant difference, such as a default system prompt the upstream's template adds.
    prompt_token_offset = models.IntegerField(
        _("prompt token offset"),
        default=0,
        help_text=_(
            "Tokens added to each counted prompt; learnt from the self-check against the upstream."
        ),
    )
    correct_offset_automatically = models.BooleanField(
        _("correct the offset automatically"),
        default=False,
        help_text=_(
            "When the self-check finds a constant difference from the upstream's counts, use it "
            "as the prompt token offset. Off: the difference is only reported."
        ),
    )
    # The estimator's per-model refit from reconciled ledger rows ({} until fitted).
    estimator_fit = models.JSONField(_("estimator fit"), default=dict, blank=True, editable=False)
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
        if isinstance(self.more_upstream_urls, list):
            urls = [normalize_upstream_url(str(url)) for url in self.more_upstream_urls]
            self.more_upstream_urls = list(dict.fromkeys(u for u in urls if u))


CHECK_OUTCOMES = [
    ("ok", _("equal to the upstream")),
    ("mismatch", _("differs from the upstream")),
    ("estimated", _("estimated (no tokenizer)")),
    ("failed", _("upstream gave no counts")),
]


class TokenizerCheck(models.Model):
    """One self-check of a model's token counting against its upstream: probe conversations sent
    with max_tokens 1, the upstream's usage.prompt_tokens beside the gateway's own count."""

    model = models.ForeignKey(
        ServedModel, on_delete=models.CASCADE, related_name="tokenizer_checks"
    )
    checked_at = models.DateTimeField(_("checked at"), auto_now_add=True, db_index=True)
    # ok: every probe equal (after the offset in use); mismatch: a difference; failed: the
    # upstream did not answer usable counts (nothing learnt).
    outcome = models.CharField(_("outcome"), max_length=20, choices=CHECK_OUTCOMES)
    counter_source = models.CharField(_("token counter"), max_length=500, blank=True)
    offset_seen = models.IntegerField(_("offset seen"), null=True, blank=True)
    probes = models.JSONField(_("probes"), default=list, blank=True)
    detail = models.CharField(_("detail"), max_length=500, blank=True)

    class Meta:
        verbose_name = _("tokenizer check")
        verbose_name_plural = _("tokenizer checks")
        ordering = ["-checked_at"]

    def __str__(self) -> str:
        # Local time (Asia/Seoul), as the admin shows the column beside it.
        return f"{timezone.localtime(self.checked_at):%Y-%m-%d %H:%M:%S}"


# What an import_config file manages, by kind (ConfigImport.kind).
CONFIG_KINDS = [
    ("plan", _("plan")),
    ("model", _("served model")),
    ("user", _("user")),
    ("api_key", _("API key")),
]


class ConfigImport(models.Model):
    """An object import_config manages: the file it came from and the values that file set at
    the last import, so that a re-import tells an edit in the admin (kept, reported as a
    conflict) from an edit of the file (applied). gateway/config_state.py."""

    kind = models.CharField(_("kind"), max_length=20, choices=CONFIG_KINDS)
    name = models.CharField(_("name"), max_length=200)  # plan/model/user name, key prefix
    file = models.CharField(_("managed by file"), max_length=500)
    values = models.JSONField(_("values set by the file"), default=dict)
    imported_at = models.DateTimeField(_("last imported"), auto_now=True)

    class Meta:
        verbose_name = _("object managed by a config file")
        verbose_name_plural = _("objects managed by config files")
        ordering = ["kind", "name"]
        constraints = [
            models.UniqueConstraint(fields=["kind", "name"], name="config_import_kind_name")
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} ({self.file})"
