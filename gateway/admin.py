"""Admin for the models the gateway serves."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin
from django.db import models
from django.http import HttpRequest
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from gateway.models import ServedModel


def _formfield(db_field: models.Field[Any, Any], **kwargs: Any) -> forms.Field | None:
    # Upstreams are usually plain HTTP on a private network: "gpu-1:8000" means http://.
    if isinstance(db_field, models.URLField):
        kwargs.setdefault("assume_scheme", "http")
    return db_field.formfield(**kwargs)


class ServedModelForm(forms.ModelForm):
    class Meta:
        model = ServedModel
        formfield_callback = _formfield
        fields = (
            "name",
            "aliases",
            "upstream_url",
            "tokenizer",
            "context_length",
            "korean_factor",
            "request_timeout_seconds",
            "is_active",
            "description",
        )

    def clean_aliases(self) -> list[str]:
        aliases = self.cleaned_data["aliases"] or []
        if not isinstance(aliases, list) or not all(
            isinstance(alias, str) and alias for alias in aliases
        ):
            raise forms.ValidationError(gettext('Enter a list of names, e.g. ["korean-qwen"].'))
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
class ServedModelAdmin(admin.ModelAdmin):
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
    )
    list_filter = ("is_active",)
    search_fields = ("name",)

    def formfield_for_dbfield(
        self, db_field: models.Field[Any, Any], request: HttpRequest, **kwargs: Any
    ) -> forms.Field | None:
        # The admin builds its form fields again through here (see _formfield).
        if isinstance(db_field, models.URLField):
            kwargs.setdefault("assume_scheme", "http")
        return super().formfield_for_dbfield(db_field, request, **kwargs)

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
