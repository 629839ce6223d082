"""Admin for plans, user quotas and the (read-only) usage ledger."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.models import User
from django.core.paginator import Paginator
from django.db import connections, models, transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from accounts import admin as accounts_admin
from accounts.admin import AuditedAdmin, ReadOnlyAdmin
from accounts.models import AuditAction
from accounts.services import record_edit
from quotas.models import LedgerDeadLetter, Plan, UsageRecord, UserQuota
from quotas.services import DEFAULT_PLAN_NAME, PlanInUse, delete_plan, replay_dead_letters
from tokenlimit.limiter import LIMIT_FIELDS


@admin.register(Plan)
class PlanAdmin(AuditedAdmin):
    audit_action = AuditAction.PLAN_CHANGED
    audit_created_action = AuditAction.PLAN_CREATED
    list_display = (
        "name", *LIMIT_FIELDS, "allowed_models", "extra_request_fields", "priority",
        "self_service_keys", "max_keys_per_user",
    )  # fmt: skip
    search_fields = ("name",)
    fieldsets = (
        (None, {"fields": ("name", "description")}),
        (_("Limits"), {"fields": LIMIT_FIELDS}),
        (
            _("What clients may ask for"),
            {
                "fields": (
                    "allowed_models",
                    "extra_request_fields",
                    "priority",
                    "isolate_prefix_cache",
                )
            },
        ),
        (_("Self-service API keys"), {"fields": ("self_service_keys", "max_keys_per_user")}),
    )

    def has_delete_permission(self, request: HttpRequest, obj: Plan | None = None) -> bool:
        # Every user without a plan of their own is on the default plan (delete_plan refuses).
        if obj is not None and obj.name == DEFAULT_PLAN_NAME:
            return False
        return super().has_delete_permission(request, obj)

    def delete_model(self, request: HttpRequest, obj: Plan) -> None:
        self._delete(request, [obj])

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Plan]) -> None:
        self._delete(request, list(queryset))

    def _delete(self, request: HttpRequest, plans: list[Plan]) -> None:
        # Through the service, audited. The admin's confirmation page has already refused
        # plans with users (PROTECT); PlanInUse here means users joined meanwhile.
        actor = accounts_admin.acting_user(request)
        for plan in plans:
            try:
                delete_plan(plan, actor=actor)
            except PlanInUse as exc:
                self.message_user(request, f"{plan}: {exc}", messages.ERROR)


class UserQuotaInline(admin.StackedInline):
    """Shown on the user page; blank limits fall back to the plan's."""

    model = UserQuota
    max_num = 1
    fields = ("plan", "description", *LIMIT_FIELDS, "allowed_models")


# The user page of accounts/admin.py, with the user's plan and limits: this layer knows them
# (accounts, below it, must not import quotas).
admin.site.unregister(User)


@admin.register(User)
class UserAdmin(accounts_admin.UserAdmin):
    inlines = (UserQuotaInline,)

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        """The quota section is audited like a change through set_user_quota: the user is the
        target, the acting admin the actor."""
        edited = [f for f in formset.forms if f.has_changed() and f not in formset.deleted_forms]
        before = {f.instance.pk: UserQuota.objects.filter(pk=f.instance.pk).first() for f in edited}
        with transaction.atomic():
            super().save_formset(request, form, formset, change)
            actor = accounts_admin.acting_user(request)
            for edit in edited:
                quota = edit.instance
                record_edit(
                    actor, AuditAction.QUOTA_CHANGED, quota.user, before.get(quota.pk), quota,
                    list(edit.changed_data),
                )  # fmt: skip


def _effective_column(field: str) -> Callable[[UserQuota], str]:
    model_field = UserQuota._meta.get_field(field)
    assert isinstance(model_field, models.Field)

    @admin.display(description=model_field.verbose_name)
    def column(quota: UserQuota) -> str:
        value = getattr(quota.effective_limits(), field)
        # Bold marks a per-user override; plain text is the plan's value.
        return format_html("<b>{}</b>", value) if getattr(quota, field) is not None else str(value)

    column.__name__ = f"effective_{field}"
    return column


@admin.register(UserQuota)
class UserQuotaAdmin(AuditedAdmin):
    audit_action = AuditAction.QUOTA_CHANGED

    def audit_target(self, obj: Any) -> Any:
        return obj.user  # as set_user_quota records it

    list_display = ("user", "plan", *(_effective_column(field) for field in LIMIT_FIELDS))
    list_filter = ("plan",)
    search_fields = ("user__username",)
    list_select_related = ("user", "plan")
    autocomplete_fields = ("user",)


class EstimatedCountPaginator(Paginator):
    """A paginator that never counts a whole huge table.

    Unfiltered on PostgreSQL it takes the planner's row estimate (pg_class.reltuples, kept
    fresh by autovacuum); anywhere else it counts at most `cap + 1` rows, so a count above
    `cap` means "more than cap". Either way the page count is approximate: a filter narrows
    the list to what counts.
    """

    cap = 10_000

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if isinstance(queryset, QuerySet) and _is_unfiltered(queryset):
            estimate = _planner_estimate(queryset)
            # Small or never-analysed tables (-1) are cheap to count within the cap.
            if estimate is not None and estimate > self.cap:
                return estimate
        if isinstance(queryset, QuerySet):
            return queryset.order_by().values("pk")[: self.cap + 1].count()
        return len(queryset)


def _is_unfiltered(queryset: QuerySet[Any]) -> bool:
    query = queryset.query
    return not query.where and not query.distinct and not query.combinator


def _planner_estimate(queryset: QuerySet[Any]) -> int | None:
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    table = connection.ops.quote_name(queryset.model._meta.db_table)
    with connection.cursor() as cursor:
        # to_regclass resolves the name through search_path, as the ORM's queries do.
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)", [table])
        row = cursor.fetchone()
    return int(row[0]) if row is not None else None


STATUS_CLASSES = {
    "2xx": (_("2xx success"), Q(status_code__gte=200, status_code__lt=300)),
    "4xx": (_("4xx client errors"), Q(status_code__gte=400, status_code__lt=500)),
    "429": (_("429 rate limited"), Q(status_code=429)),
    "5xx": (_("5xx upstream errors"), Q(status_code__gte=500)),
}


class StatusFilter(admin.SimpleListFilter):
    # Fixed classes instead of Django's default filter, which runs a DISTINCT over the ledger.
    title = _("HTTP status")
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(value, label) for value, (label, _q) in STATUS_CLASSES.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        chosen = STATUS_CLASSES.get(self.value() or "")
        return queryset.filter(chosen[1]) if chosen else queryset


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    """The ledger is history: viewable, never edited here."""

    list_display = (
        "request_id",
        "started_at",
        "user",
        "key_prefix",
        "model",
        "endpoint",
        "status_code",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "usage_source",
        "streamed",
        "client_disconnected",
        "upstream_latency_ms",
        "time_to_first_token_ms",
    )
    # No date_hierarchy: it runs DISTINCT date queries over the whole table. The date filter
    # below only adds a range condition that the started_at index serves.
    list_filter = (
        StatusFilter,
        "streamed",
        "usage_source",
        ("started_at", admin.DateFieldListFilter),
    )
    # Searched by get_search_results below; listed here so that the admin shows the box.
    search_fields = ("request_id", "user__username")
    search_help_text = _("An exact request id or username.")
    list_select_related = ("user", "api_key")
    ordering = ("-started_at",)
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # facet counts would scan the table per filter choice

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        # Exact, case-sensitive matches only: "=field" means iexact, whose UPPER() skips the
        # indexes, and an OR across the user join cannot use them either. Resolving the
        # username first leaves two index lookups on the ledger.
        term = search_term.strip()
        if not term:
            return queryset, False
        user_ids = User.objects.filter(username=term).values_list("pk", flat=True)
        return queryset.filter(Q(request_id=term) | Q(user_id__in=list(user_ids))), False

    @admin.display(description=_("API key"))
    def key_prefix(self, record: UsageRecord) -> str:
        # No FK constraint: a deleted key joins as None.
        return f"{record.api_key.prefix}…" if record.api_key is not None else "-"


@admin.register(LedgerDeadLetter)
class LedgerDeadLetterAdmin(admin.ModelAdmin):
    """Usage events the ledger could not write: the raw event and the error, and a replay."""

    list_display = ("created_at", "request_id", "source", "short_error", "replayed_at")
    list_filter = (("replayed_at", admin.EmptyFieldListFilter), "source")
    search_fields = ("=request_id",)
    readonly_fields = (
        "created_at", "source", "request_id", "raw", "error", "replayed_at", "replayed_by",
    )  # fmt: skip
    list_select_related = ("replayed_by",)
    ordering = ("-created_at",)
    actions = ["replay"]

    @admin.display(description=_("error"))
    def short_error(self, letter: LedgerDeadLetter) -> str:
        return letter.error[:120]

    @admin.action(
        description=_("Replay the selected events into the ledger"), permissions=["replay"]
    )
    def replay(self, request: HttpRequest, queryset: QuerySet[LedgerDeadLetter]) -> None:
        assert isinstance(request.user, User)
        replayed, failed = replay_dead_letters(request.user, queryset)
        self.message_user(
            request,
            _("%(replayed)d replayed, %(failed)d still failing.")
            % {"replayed": replayed, "failed": failed},
            messages.SUCCESS if not failed else messages.WARNING,
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_replay_permission(self, request: HttpRequest) -> bool:
        # Changes the ledger: for those allowed to change dead letters (superusers, or given).
        return request.user.has_perm("quotas.change_ledgerdeadletter")
