"""Admin for the models the gateway serves."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from accounts.admin import AuditedAdmin, acting_user
from accounts.admin_forms import LinesField
from accounts.models import AuditAction
from gateway.models import ServedModel
from gateway.services import delete_served_model, with_prompt_reconciliation
from quotas import admin as quotas_admin
from quotas.models import UsageRecord
from tokenlimit.tokens import get_counter

RECONCILIATION_DAYS = 7


class ServedModelForm(forms.ModelForm):
    # Lists of names, one per line (the model validators still check what comes out).
    aliases = LinesField(
        label=_("aliases"), help_text=_("Other names clients may use, one per line.")
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
            "tokenizer",
            "context_length",
            "korean_factor",
            "request_timeout_seconds",
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


@admin.register(ServedModel)
class ServedModelAdmin(AuditedAdmin):
    audit_action = AuditAction.MODEL_CHANGED
    audit_created_action = AuditAction.MODEL_CREATED
    form = ServedModelForm
    list_display = (
        "name",
        "alias_list",
        "tokenizer_shown",
        "upstream_shown",
        "context_length",
        "korean_factor",
        "request_timeout_seconds",
        "is_active",
        "token_counter",
        "reconciliation",
    )
    list_filter = ("is_active",)
    search_fields = ("name",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[ServedModel]:
        # Reconciliation: the gateway's prompt count beside the upstream's, per model, over
        # the last week (one subquery per column for the whole page).
        since = timezone.now() - timedelta(days=RECONCILIATION_DAYS)
        return with_prompt_reconciliation(super().get_queryset(request), since)

    def delete_model(self, request: HttpRequest, obj: ServedModel) -> None:
        delete_served_model(obj, actor=acting_user(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ServedModel]) -> None:
        # One by one through the service: one audit row per model, as a single delete.
        for model in queryset:
            delete_served_model(model, actor=acting_user(request))

    @admin.display(description=_("token counter"))
    def token_counter(self, model: ServedModel) -> str:
        counter = get_counter(model.name, model.tokenizer, model.korean_factor)
        return counter.source

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

    @admin.display(description=_("aliases"))
    def alias_list(self, model: ServedModel) -> str:
        return ", ".join(model.aliases or []) or "-"

    @admin.display(description=_("tokenizer"), ordering="tokenizer")
    def tokenizer_shown(self, model: ServedModel) -> Any:
        return model.tokenizer or _("(the served model name)")

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
