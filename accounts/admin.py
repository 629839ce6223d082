"""Admin for API keys and operator tokens, and Django's user admin with each user's quota
inline."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.options import InlineModelAdmin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Count, Model, OuterRef, Q, QuerySet, Subquery
from django.forms import ModelForm
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from accounts.admin_forms import key_state_badge
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
ADD_FIELDS = ("user", "name", "expires_at", *KEY_LIMIT_FIELDS)
EDITABLE_FIELDS = ("name", "expires_at", *KEY_LIMIT_FIELDS)
CHANGE_FIELDS = (
    "state_badge",
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
# Where a new key's raw value waits for the one page that shows it (then it is deleted).
NEW_KEY_SESSION = "admin_new_api_key"


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
        "state_badge",
        "created_at",
        "last_used_at",
        "expires_at",
        "imported",
    )
    list_filter = (RevokedFilter, ExpiredFilter, "imported")
    search_fields = ("prefix", "name", "user__username")
    list_select_related = ("user",)
    autocomplete_fields = ("user",)
    actions = ("revoke_selected",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        # The key's page shows its user too: one query with the key, not a second.
        return super().get_queryset(request).select_related("user")

    @admin.display(description=_("prefix"), ordering="prefix")
    def visible_prefix(self, key: ApiKey) -> str:
        return f"{key.prefix}…"

    @admin.display(description=_("state"))
    def state_badge(self, key: ApiKey) -> str:
        return key_state_badge(key.state)

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        return ADD_FIELDS if obj is None else CHANGE_FIELDS

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        if obj is not None:
            return super().get_fieldsets(request, obj)
        return (
            (None, {"fields": ("user", "name", "expires_at")}),
            (
                _("Limits of this key alone"),
                {
                    "fields": KEY_LIMIT_FIELDS,
                    "description": _(
                        "Optional, and only tighter than the user's own limits; blank: the "
                        "user's limits alone."
                    ),
                },
            ),
        )

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        if obj is None:
            return []
        return [field for field in self.get_fields(request, obj) if field not in EDITABLE_FIELDS]

    @admin.display(description=_("history"))
    def history(self, key: ApiKey) -> str:
        return history_table(ApiKey, key.pk)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: ModelForm, change: bool) -> None:
        data = form.cleaned_data
        actor = acting_user(request)
        limits = {field: data.get(field) for field in KEY_LIMIT_FIELDS}
        if change:
            # The form has already copied its values onto obj: compare against the stored row.
            stored = ApiKey.objects.get(pk=obj.pk)
            update_api_key(
                stored, actor=actor, name=data["name"], expires_at=data["expires_at"], **limits
            )
            return
        with transaction.atomic():
            key, raw_key = create_api_key(
                data["user"], actor=actor, name=data["name"], expires_at=data["expires_at"]
            )
            if any(value is not None for value in limits.values()):
                update_api_key(key, actor=actor, name=key.name, expires_at=key.expires_at, **limits)
        _adopt(obj, key)
        # Kept server-side (the session row) for the one page that shows it, which deletes it:
        # never in a message, a log entry or a URL.
        request.session[NEW_KEY_SESSION] = {"pk": key.pk, "raw": raw_key}

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: Any = None) -> Any:
        return HttpResponseRedirect(reverse("admin:accounts_apikey_new", args=[obj.pk]))

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("<int:key_id>/revoke/", wrap(self.revoke_view), name="accounts_apikey_revoke"),
            path("<int:key_id>/new/", wrap(self.new_key_view), name="accounts_apikey_new"),
            *super().get_urls(),
        ]

    def _key_or_404(self, request: HttpRequest, key_id: int) -> ApiKey:
        key = ApiKey.objects.select_related("user").filter(pk=key_id).first()
        if key is None:
            raise Http404
        return key

    def new_key_view(self, request: HttpRequest, key_id: int) -> HttpResponse:
        """The one page that shows a key just added: the raw key leaves the session here."""
        key = self._key_or_404(request, key_id)
        if not self.has_view_or_change_permission(request, key):
            raise PermissionDenied
        stored = request.session.get(NEW_KEY_SESSION)
        raw_key = None
        if isinstance(stored, dict) and stored.get("pk") == key.pk:
            raw_key = stored.get("raw")
            del request.session[NEW_KEY_SESSION]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": gettext("New API key"),
            "key": key,
            "raw_key": raw_key,
            "change_url": reverse("admin:accounts_apikey_change", args=[key.pk]),
        }
        response = TemplateResponse(request, "admin/accounts/apikey/new_key.html", context)
        # Neither a browser nor a proxy may keep the page with the key.
        add_never_cache_headers(response)
        response["Cache-Control"] += ", no-store"
        return response

    def revoke_view(self, request: HttpRequest, key_id: int) -> HttpResponse:
        """GET: what revoking does; POST (CSRF-checked by the admin): revoke, audited."""
        key = self._key_or_404(request, key_id)
        if not self.has_change_permission(request, key):
            raise PermissionDenied
        change_url = reverse("admin:accounts_apikey_change", args=[key.pk])
        if request.method == "POST":
            count = revoke_api_keys([key], actor=acting_user(request))
            if count:
                message = gettext("The key %(prefix)s… is revoked.") % {"prefix": key.prefix}
                self.message_user(request, message, messages.SUCCESS)
            else:
                message = gettext("The key %(prefix)s… was already revoked.")
                self.message_user(request, message % {"prefix": key.prefix}, messages.WARNING)
            return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": gettext("Revoke this API key?"),
            "keys": [key],
            "single": True,
            "change_url": change_url,
        }
        return TemplateResponse(request, "admin/accounts/apikey/revoke_confirmation.html", context)

    @admin.action(description=_("Revoke selected keys"), permissions=["change"])
    def revoke_selected(
        self, request: HttpRequest, queryset: QuerySet[ApiKey]
    ) -> TemplateResponse | None:
        if request.POST.get("post") != "yes":
            # First a page that says what will happen, as delete_selected does.
            keys = list(queryset.select_related("user").order_by("-created_at"))
            context = {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": gettext("Revoke the selected API keys?"),
                "keys": keys,
                "single": False,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "select_across": request.POST.get("select_across", "0"),
            }
            return TemplateResponse(
                request, "admin/accounts/apikey/revoke_confirmation.html", context
            )
        ids = list(queryset.values_list("pk", flat=True))
        count = revoke_api_keys(key_ids=ids, actor=acting_user(request))
        message = ngettext("%(count)d key revoked.", "%(count)d keys revoked.", count)
        self.message_user(request, message % {"count": count}, messages.SUCCESS)
        return None


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


# The newest keys listed on a user's page; the key list filtered by the user has them all.
USER_PAGE_KEYS = 20


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    """Django's user pages; the layers above add what they know (quotas/admin.py: the plan,
    telemetry/admin.py: usage). Each adds its read-only summaries to `summary_fields`, shown in
    one section of the change page."""

    list_display: tuple[str, ...] = ("username", "email", "is_staff", "is_active", "key_count")
    summary_fields: tuple[str, ...] = ("api_keys_table",)

    def get_inlines(
        self, request: HttpRequest, obj: User | None
    ) -> list[type[InlineModelAdmin[Any, Any]]]:
        # Django's add-user page is a short username/password step; the quota comes after.
        return list(self.inlines) if obj is not None else []

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        # The active keys as one subquery of the list's query, not a query per row.
        active = (
            ApiKey.objects.active()
            .filter(user=OuterRef("pk"))
            .order_by()
            .values("user")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return super().get_queryset(request).annotate(active_keys=Subquery(active[:1]))

    @admin.display(description=_("active keys"), ordering="active_keys")
    def key_count(self, user: Any) -> int:
        return user.active_keys or 0

    def get_fieldsets(self, request: HttpRequest, obj: User | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            return fieldsets
        # Right after the name and password: what an operator opens a user's page for, above
        # Django's long permission pickers.
        summary = (_("API keys, limits and usage"), {"fields": self.summary_fields})
        return (fieldsets[0], summary, *fieldsets[1:])

    def get_readonly_fields(self, request: HttpRequest, obj: User | None = None) -> Any:
        fields = tuple(super().get_readonly_fields(request, obj))
        return fields + self.summary_fields if obj is not None else fields

    @admin.display(description=_("API keys"))
    def api_keys_table(self, user: User) -> str:
        keys = list(ApiKey.objects.filter(user=user).order_by("-created_at")[: USER_PAGE_KEYS + 1])
        if not keys:
            return gettext("No API keys.")
        rows = format_html_join(
            "",
            '<tr><td>{}</td><td><a href="{}"><code>{}…</code></a></td><td>{}</td><td>{}</td>'
            "<td>{}</td></tr>",
            (
                (
                    key_state_badge(key.state),
                    reverse("admin:accounts_apikey_change", args=[key.pk]),
                    key.prefix,
                    key.name or "-",
                    _local(key.last_used_at),
                    _local(key.expires_at),
                )
                for key in keys[:USER_PAGE_KEYS]
            ),
        )
        header = format_html(
            "<tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
            gettext("state"),
            gettext("prefix"),
            gettext("name"),
            gettext("last used"),
            gettext("expires"),
        )
        query = urlencode({"user__id__exact": user.pk})
        every = f"{reverse('admin:accounts_apikey_changelist')}?{query}"
        more = format_html('<p><a href="{}">{}</a></p>', every, gettext("All keys of this user"))
        return format_html(
            '<table class="admin-summary" id="user-keys">{}{}</table>{}', header, rows, more
        )


def _local(moment: datetime | None) -> str:
    """A time in Asia/Seoul to the minute, or "-"."""
    if moment is None:
        return "-"
    return date_format(timezone.localtime(moment), "Y-m-d H:i")
