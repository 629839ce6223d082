"""Admin for the models the gateway serves."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from accounts.admin import AuditedAdmin, acting_user
from accounts.admin_forms import LinesField
from accounts.models import AuditAction
from gateway.caches import fit_pairs
from gateway.config_import import KIND_NAMES
from gateway.models import CHECK_OUTCOMES, ConfigImport, ServedModel, TokenizerCheck
from gateway.self_check import check_now
from gateway.services import (
    delete_served_model,
    save_served_model,
    with_latest_check,
    with_prompt_reconciliation,
)
from quotas import admin as quotas_admin
from quotas.models import UsageRecord
from tokenlimit.tokens import get_counter

RECONCILIATION_DAYS = 7


class ServedModelForm(forms.ModelForm):
    # Lists of names, one per line (the model validators still check what comes out).
    aliases = LinesField(
        label=_("aliases"), help_text=_("Other names clients may use, one per line.")
    )
    more_upstream_urls = LinesField(
        label=_("more upstream URLs"),
        help_text=_(
            "Other servers running the same model, one address per line, e.g. "
            "http://sglang-2:8000. Requests go to the least loaded, a user's requests to the "
            "same server while it is not much busier (its prefix cache stays warm); a server "
            "that refuses connections or fails its load readings is left out until it recovers."
        ),
    )
    lora_adapters = LinesField(
        label=_("LoRA adapters"),
        help_text=_(
            "Adapter names the server has loaded (--lora-paths name=path), one per line. "
            'Clients ask for one as "model:adapter" or with lora_path; plans allow them.'
        ),
    )

    class Meta:
        model = ServedModel
        fields = (
            "name",
            "aliases",
            "upstream_url",
            "more_upstream_urls",
            "upstream_kind",
            "tokenizer",
            "chat_template",
            "prompt_token_offset",
            "correct_offset_automatically",
            "context_length",
            "korean_factor",
            "request_timeout_seconds",
            "max_concurrent_requests",
            "lora_adapters",
            "accepts_media",
            "is_active",
            "description",
        )

    def clean_aliases(self) -> list[str]:
        aliases: list[str] = self.cleaned_data["aliases"] or []
        # The gateway resolves a name to one model: an alias must not be taken elsewhere.
        others = ServedModel.objects.exclude(pk=self.instance.pk).filter(is_active=True)
        taken = sorted(
            alias
            for other in others
            for alias in aliases
            if alias == other.name or alias in (other.aliases or [])
        )
        if taken:
            message = gettext("Already used by another active model: %(names)s")
            raise forms.ValidationError(message % {"names": ", ".join(taken)})
        return aliases


class TokenizerCheckInline(admin.TabularInline):
    model = TokenizerCheck
    extra = 0
    max_num = 0  # read-only history: checks are written by the gateways
    can_delete = False
    fields = ("checked_at", "outcome", "offset_seen", "counter_source", "detail")
    readonly_fields = fields
    ordering = ("-checked_at",)
    verbose_name_plural = _("tokenizer self-checks (newest first)")


@admin.register(ServedModel)
class ServedModelAdmin(AuditedAdmin):
    audit_action = AuditAction.MODEL_CHANGED
    audit_created_action = AuditAction.MODEL_CREATED
    form = ServedModelForm
    # What an operator scans the list for; aliases, tokenizer, context and timeouts are on the
    # model's page (the list must fit a laptop screen).
    list_display = (
        "name",
        "upstream_shown",
        "upstream_kind",
        "is_active",
        "token_counter",
        "self_check",
        "reconciliation",
    )
    list_filter = ("is_active", "upstream_kind")
    search_fields = ("name",)
    inlines = [TokenizerCheckInline]
    actions = ["run_self_check", "accept_offset_seen"]
    readonly_fields = ("estimator_fit_shown", "managed_by")

    @admin.display(description=_("estimator fit"))
    def estimator_fit_shown(self, model: ServedModel) -> str:
        fit = model.estimator_fit or {}
        if not fit:
            return gettext("none (refitted hourly from the ledger when the model is estimated)")
        return gettext(
            "×%(scale).3f %(offset)+.1f from %(rows)d requests: error %(before).1f%% → "
            "%(after).1f%%"
        ) % {
            "scale": fit.get("scale", 1.0),
            "offset": fit.get("offset", 0.0),
            "rows": fit.get("rows", 0),
            "before": 100 * fit.get("error_before", 0.0),
            "after": 100 * fit.get("error_after", 0.0),
        }

    @admin.display(description=_("managed by file"))
    def managed_by(self, model: ServedModel) -> str:
        row = ConfigImport.objects.filter(kind="model", name=model.name).first()
        return row.file if row is not None else "-"

    def get_queryset(self, request: HttpRequest) -> QuerySet[ServedModel]:
        # Reconciliation: the gateway's prompt count beside the upstream's, per model, over
        # the last week (one subquery per column for the whole page).
        since = timezone.now() - timedelta(days=RECONCILIATION_DAYS)
        return with_latest_check(with_prompt_reconciliation(super().get_queryset(request), since))

    @admin.display(description=_("tokenizer self-check"))
    def self_check(self, model: Any) -> str:
        if model.check_outcome is None:
            return gettext("not checked yet")
        outcome = dict(CHECK_OUTCOMES).get(model.check_outcome, model.check_outcome)
        if model.check_offset:
            return gettext("%(outcome)s: the upstream counts %(offset)+d tokens") % {
                "outcome": outcome,
                "offset": model.check_offset,
            }
        return str(outcome)

    @admin.action(description=_("Run the tokenizer self-check now"))
    def run_self_check(self, request: HttpRequest, queryset: QuerySet[ServedModel]) -> None:
        for model in queryset:
            result = check_now(model)
            level = messages.SUCCESS if result.outcome == "ok" else messages.WARNING
            self.message_user(request, f"{model.name}: {result.detail}", level)

    @admin.action(description=_("Accept the offset the last self-check saw"))
    def accept_offset_seen(self, request: HttpRequest, queryset: QuerySet[ServedModel]) -> None:
        for model in with_latest_check(queryset):
            offset = getattr(model, "check_offset", None)
            if not offset:
                message = gettext("%(model)s: no constant offset to accept.")
                self.message_user(request, message % {"model": model.name}, messages.WARNING)
                continue
            new = model.prompt_token_offset + offset
            save_served_model(actor=acting_user(request), model=model, prompt_token_offset=new)
            message = gettext("%(model)s: prompt token offset is now %(offset)d.")
            self.message_user(request, message % {"model": model.name, "offset": new})

    def delete_model(self, request: HttpRequest, obj: ServedModel) -> None:
        delete_served_model(obj, actor=acting_user(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ServedModel]) -> None:
        # One by one through the service: one audit row per model, as a single delete.
        for model in queryset:
            delete_served_model(model, actor=acting_user(request))

    @admin.display(description=_("token counter"))
    def token_counter(self, model: ServedModel) -> str:
        counter = get_counter(
            model.name,
            model.tokenizer,
            model.korean_factor,
            chat_template=model.chat_template,
            estimator_fit=fit_pairs(model.estimator_fit),
        )
        # A tokenizer's full path would push the other columns off the screen: its last two
        # parts, the whole in the tooltip.
        shown = re.sub(r"(?<=tokenizer:)/\S*?((?:/[^/\s]+){2})(?=\s|$)", r"…\1", counter.source)
        return format_html('<span title="{}">{}</span>', counter.source, shown)

    @admin.display(description=_("prompt counts vs upstream (7 days)"))
    def reconciliation(self, model: Any) -> str:
        if not model.checked:
            return gettext("no requests yet")
        if not model.differing:
            return gettext("all %(checked)d equal") % {"checked": model.checked}
        return gettext("%(differing)d of %(checked)d differ, by %(gap).1f tokens on average") % {
            "differing": model.differing,
            "checked": model.checked,
            "gap": model.mean_gap or 0,
        }

    @admin.display(description=_("upstream URL"), ordering="upstream_url")
    def upstream_shown(self, model: ServedModel) -> str:
        if model.upstream_url:
            return model.upstream_url
        return gettext("SGLANG_URL (%(url)s)") % {"url": settings.SGLANG_URL}


class ServedModelFilter(admin.SimpleListFilter):
    # The model list comes from the small ServedModel table: a DISTINCT over the ledger would
    # read all of it.
    title = _("model")
    parameter_name = "model"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = ServedModel.objects.order_by("name").values_list("name", flat=True)
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(model=self.value()) if self.value() else queryset


# The ledger's admin (quotas/admin.py) with a filter by served model: this layer knows them.
admin.site.unregister(UsageRecord)


@admin.register(UsageRecord)
class UsageRecordAdmin(quotas_admin.UsageRecordAdmin):
    list_filter = (ServedModelFilter, *quotas_admin.UsageRecordAdmin.list_filter)  # type: ignore[assignment]


@admin.register(ConfigImport)
class ConfigImportAdmin(admin.ModelAdmin):
    """What `manage.py import_config` manages, read-only: the file and the values it set last
    (an edit in the admin is kept over a re-import and reported: gateway/config_state.py)."""

    list_display = ("kind_shown", "name", "file", "imported_at")
    list_filter = ("kind", "file")
    search_fields = ("name", "file")
    readonly_fields = ("kind", "name", "file", "values", "imported_at")

    @admin.display(description=_("kind"), ordering="kind")
    def kind_shown(self, row: ConfigImport) -> str:
        return str(KIND_NAMES.get(row.kind, row.kind))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
