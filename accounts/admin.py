"""Admin for API keys and operator tokens, and Django's user admin with each user's quota
inline."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.options import InlineModelAdmin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Model, Q, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from accounts.models import ApiKey, AuditAction, AuditEvent, OperatorToken
from accounts.services import (
    KEY_LIMIT_FIELDS,
    audit_target,
    check_expiry,
    create_api_key,
    create_operator_token,
    record_edit,
    revoke_api_keys,
    revoke_operator_token,
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
    "history",
)
# The newest events shown on a key's page; the audit log itself lists them all.
HISTORY_ROWS = 50


class ReadOnlyAdmin(admin.ModelAdmin):
    """History (the audit trail, the ledger, samples, roll-ups): viewable, never edited here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AuditedAdmin(admin.ModelAdmin):
    """An admin page whose saves are audited like a service's changes: who, old → new."""

    audit_action: AuditAction
    # What an object added on the page is recorded as (None: audit_action).
    audit_created_action: AuditAction | None = None

    def audit_target(self, obj: Any) -> Any:
        return obj

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        before = type(obj).objects.filter(pk=obj.pk).first() if change else None
        action = self.audit_action if change else self.audit_created_action or self.audit_action
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            fields = list(form.changed_data)
            target = self.audit_target(obj)
            record_edit(acting_user(request), action, target, before, obj, fields)


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

    @admin.display(description=_("history"))
    def history(self, key: ApiKey) -> str:
        return history_table(ApiKey, key.pk)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: ModelForm, change: bool) -> None:
        data = form.cleaned_data
        actor = acting_user(request)
        if change:
            # The form has already copied its values onto obj: compare against the stored row.
            stored = ApiKey.objects.get(pk=obj.pk)
            limits = {field: data.get(field) for field in KEY_LIMIT_FIELDS}
            update_api_key(
                stored, actor=actor, name=data["name"], expires_at=data["expires_at"], **limits
            )
            return
        key, raw_key = create_api_key(
            data["user"], actor=actor, name=data["name"], expires_at=data["expires_at"]
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
        ids = list(queryset.values_list("pk", flat=True))
        count = revoke_api_keys(key_ids=ids, actor=acting_user(request))
        message = ngettext("%(count)d key revoked.", "%(count)d keys revoked.", count)
        self.message_user(request, message % {"count": count}, messages.SUCCESS)


class OperatorTokenForm(ModelForm):
    def clean_expires_at(self) -> datetime | None:
        try:
            return check_expiry(self.cleaned_data.get("expires_at"))
        except ValidationError as exc:
            raise ValidationError(exc.message_dict["expires_at"]) from None


TOKEN_ADD_FIELDS = ("user", "name", "scope", "expires_at")
TOKEN_CHANGE_FIELDS = (
    "prefix", "user", "name", "scope", "created_at", "last_used_at", "expires_at", "revoked_at",
    "history",
)  # fmt: skip


@admin.register(OperatorToken)
class OperatorTokenAdmin(admin.ModelAdmin):
    """Tokens for scripts that run the platform through the REST API. Created here (the raw
    token shown once) and revoked, never edited or deleted: both go through the services, so
    both are audited."""

    form = OperatorTokenForm
    list_display = (
        "visible_prefix", "name", "user", "scope", "state", "created_at", "last_used_at",
        "expires_at",
    )  # fmt: skip
    list_filter = ("scope", RevokedFilter, ExpiredFilter)
    search_fields = ("prefix", "name", "user__username")
    list_select_related = ("user",)
    autocomplete_fields = ("user",)
    actions = ("revoke_selected",)

    @admin.display(description=_("prefix"), ordering="prefix")
    def visible_prefix(self, token: OperatorToken) -> str:
        return f"{token.prefix}…"

    @admin.display(description=_("state"))
    def state(self, token: OperatorToken) -> str:
        if token.revoked_at is not None:
            return gettext("revoked")
        if token.expires_at is not None and token.expires_at <= timezone.now():
            return gettext("expired")
        if not token.user.is_active or not token.user.is_staff:
            # find_operator_token refuses it while its user is not active staff.
            return gettext("user not active staff")
        return gettext("active")

    def get_fields(self, request: HttpRequest, obj: OperatorToken | None = None) -> tuple[str, ...]:
        return TOKEN_ADD_FIELDS if obj is None else TOKEN_CHANGE_FIELDS

    def get_readonly_fields(
        self, request: HttpRequest, obj: OperatorToken | None = None
    ) -> tuple[str, ...]:
        return () if obj is None else TOKEN_CHANGE_FIELDS

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Revoked, not deleted: the row keeps the token's audit trail readable.
        return False

    @admin.display(description=_("history"))
    def history(self, token: OperatorToken) -> str:
        return history_table(OperatorToken, token.pk)

    def save_model(
        self, request: HttpRequest, obj: OperatorToken, form: ModelForm, change: bool
    ) -> None:
        if change:
            return  # every field is read-only once created
        data = form.cleaned_data
        token, raw_token = create_operator_token(
            data["user"],
            actor=acting_user(request),
            name=data["name"],
            scope=data["scope"],
            expires_at=data["expires_at"],
        )
        _adopt(obj, token)
        # As with API keys: only in this message, consumed when shown, never saved.
        message = gettext(
            "New operator token for %(user)s: %(token)s — copy it now. It is shown only this "
            "once and cannot be recovered; only its hash is stored."
        )
        messages.success(request, message % {"user": token.user, "token": raw_token})

    @admin.action(description=_("Revoke selected tokens"), permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[OperatorToken]) -> None:
        actor = acting_user(request)
        count = sum(
            revoke_operator_token(token, actor=actor)
            for token in queryset.filter(revoked_at__isnull=True)
        )
        message = ngettext("%(count)d token revoked.", "%(count)d tokens revoked.", count)
        self.message_user(request, message % {"count": count}, messages.SUCCESS)


def _adopt(form_instance: Model, created: Model) -> None:
    """Turn the admin's unsaved form instance into the row the service created, so that the
    admin's log entry and redirect point at the real row."""
    for field in type(created)._meta.concrete_fields:
        setattr(form_instance, field.attname, getattr(created, field.attname))
    form_instance._state.adding = False
    form_instance._state.db = created._state.db


def acting_user(request: HttpRequest) -> User:
    # The admin lets in only logged-in staff: an anonymous user here is a bug, not a case.
    assert isinstance(request.user, User)
    return request.user


# --- The audit log ------------------------------------------------------------------------------


def summarize(details: dict[str, Any], limit: int = 200) -> str:
    """One line for an audit row's details: "field: old → new, …" (facts as "field: value")."""
    parts = []
    for field, value in details.items():
        if isinstance(value, dict) and value.keys() == {"old", "new"}:
            parts.append(f"{field}: {_shown(value['old'])} → {_shown(value['new'])}")
        else:
            parts.append(f"{field}: {_shown(value)}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def history_table(model: type[Model], pk: int) -> str:
    """One object's newest audit events, with a link to the rest (for a change page)."""
    events = AuditEvent.objects.filter(**audit_target(model, pk))[: HISTORY_ROWS + 1]
    return render_history(list(events), audit_log_url(model, pk))


def render_history(events: list[AuditEvent], more_url: str) -> str:
    """A key's audit events as a small table, newest first, with a link to the rest."""
    if not events:
        return gettext("No recorded changes.")
    rows = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        (
            (
                date_format(timezone.localtime(event.created_at), "DATETIME_FORMAT"),
                event.actor_label,
                event.get_action_display(),
                summarize(event.details),
            )
            for event in events[:HISTORY_ROWS]
        ),
    )
    more = (
        format_html('<p><a href="{}">{}</a></p>', more_url, gettext("All events"))
        if len(events) > HISTORY_ROWS
        else ""
    )
    header = format_html(
        "<tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
        gettext("when"),
        gettext("who"),
        gettext("action"),
        gettext("what changed"),
    )
    return format_html("<table>{}{}</table>{}", header, rows, more)


def audit_log_url(model: type[Model], pk: int) -> str:
    query = urlencode(audit_target(model, pk))
    return f"{reverse('admin:accounts_auditevent_changelist')}?{query}"


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """Who changed what: written only by the services, never added, edited or deleted here."""

    list_display = ("created_at", "actor_label", "action", "target", "short_details")
    list_filter = ("action",)
    search_fields = ("actor__username", "actor_label")
    search_help_text = _("The actor's username (or the command's name).")
    list_select_related = ("actor",)
    ordering = ("-created_at", "-pk")
    # Unfiltered, Django would count the whole table twice (the result and the "total").
    show_full_result_count = False
    fields = (
        "created_at", "actor", "actor_label", "action", "target_type", "target_id",
        "target_label", "details",
    )  # fmt: skip

    @admin.display(description=_("target"), ordering="target_label")
    def target(self, event: AuditEvent) -> str:
        return f"{event.target_label} ({event.target_type} #{event.target_id})"

    @admin.display(description=_("details"))
    def short_details(self, event: AuditEvent) -> str:
        return summarize(event.details, limit=120)


admin.site.unregister(User)


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    """Django's user pages; the layers above add what they know (quotas/admin.py: the plan)."""

    def get_inlines(
        self, request: HttpRequest, obj: User | None
    ) -> list[type[InlineModelAdmin[Any, Any]]]:
        # Django's add-user page is a short username/password step; the quota comes after.
        return list(self.inlines) if obj is not None else []
