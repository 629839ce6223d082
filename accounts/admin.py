"""Admin for API keys, and Django's user admin with each user's quota inline."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.options import InlineModelAdmin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.models import User
from django.db.models import Q, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from accounts.models import ApiKey
from accounts.services import (
    KEY_LIMIT_FIELDS,
    create_api_key,
    revoke_api_keys,
    update_api_key,
)


class YesNoFilter(admin.SimpleListFilter):
    """A yes/no filter on one condition; subclasses give the condition."""

    def condition(self) -> Q:
        raise NotImplementedError

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("Yes")), ("no", _("No"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.filter(self.condition())
        if self.value() == "no":
            return queryset.exclude(self.condition())
        return queryset


class RevokedFilter(YesNoFilter):
    title = _("revoked")
    parameter_name = "revoked"

    def condition(self) -> Q:
        return Q(revoked_at__isnull=False)


class ExpiredFilter(YesNoFilter):
    title = _("expired")
    parameter_name = "expired"

    def condition(self) -> Q:
        return Q(expires_at__lte=timezone.now())


# What the add form asks for; everything else comes from create_api_key.
ADD_FIELDS = ("user", "name", "expires_at")
EDITABLE_FIELDS = ("name", "expires_at", *KEY_LIMIT_FIELDS)
CHANGE_FIELDS = (
    "prefix",
    "user",
    "name",
    "expires_at",
    "created_at",
    "last_used_at",
    "revoked_at",
    "imported",
    *KEY_LIMIT_FIELDS,
)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    # key_hash is in no list, form or filter: it is a secret's only trace.
    list_display = (
        "visible_prefix",
        "name",
        "user",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "imported",
    )
    list_filter = (RevokedFilter, ExpiredFilter, "imported")
    search_fields = ("prefix", "name", "user__username")
    list_select_related = ("user",)
    autocomplete_fields = ("user",)
    actions = ("revoke_selected",)

    @admin.display(description=_("prefix"), ordering="prefix")
    def visible_prefix(self, key: ApiKey) -> str:
        return f"{key.prefix}…"

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        return ADD_FIELDS if obj is None else CHANGE_FIELDS

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        if obj is None:
            return []
        return [field for field in CHANGE_FIELDS if field not in EDITABLE_FIELDS]

    def save_model(self, request: HttpRequest, obj: ApiKey, form: ModelForm, change: bool) -> None:
        data = form.cleaned_data
        if change:
            # The form has already copied its values onto obj: compare against the stored row.
            stored = ApiKey.objects.get(pk=obj.pk)
            limits = {field: data.get(field) for field in KEY_LIMIT_FIELDS}
            update_api_key(stored, name=data["name"], expires_at=data["expires_at"], **limits)
            return
        key, raw_key = create_api_key(
            data["user"], name=data["name"], expires_at=data["expires_at"]
        )
        _adopt(obj, key)
        # The raw key exists only in this message: it is consumed when shown (messages are
        # kept in the signed cookie only until the next page renders them) and never saved.
        message = gettext(
            "New API key for %(user)s: %(key)s — copy it now. It is shown only this once and "
            "cannot be recovered; only its hash is stored."
        )
        messages.success(request, message % {"user": key.user, "key": raw_key})

    @admin.action(description=_("Revoke selected keys"), permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = revoke_api_keys(key_ids=list(queryset.values_list("pk", flat=True)))
        message = ngettext("%(count)d key revoked.", "%(count)d keys revoked.", count)
        self.message_user(request, message % {"count": count}, messages.SUCCESS)


def _adopt(form_instance: ApiKey, created: ApiKey) -> None:
    """Turn the admin's unsaved form instance into the key the service created, so that the
    admin's log entry and redirect point at the real row."""
    for field in ApiKey._meta.concrete_fields:
        setattr(form_instance, field.attname, getattr(created, field.attname))
    form_instance._state.adding = False
    form_instance._state.db = created._state.db


admin.site.unregister(User)


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    """Django's user pages; the layers above add what they know (quotas/admin.py: the plan)."""

    def get_inlines(
        self, request: HttpRequest, obj: User | None
    ) -> list[type[InlineModelAdmin[Any, Any]]]:
        # Django's add-user page is a short username/password step; the quota comes after.
        return list(self.inlines) if obj is not None else []
