"""Admin for plans, user quotas and the (read-only) usage ledger."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.models import User
from django.contrib.humanize.templatetags.humanize import intcomma
from django.core.paginator import Paginator
from django.db import connections, models, transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format, number_format
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from accounts import admin as accounts_admin
from accounts.admin import AuditedAdmin, ReadOnlyAdmin
from accounts.admin_forms import LinesField, badge
from accounts.models import ApiKey, AuditAction
from accounts.services import record_edit
from quotas.models import LedgerDeadLetter, Plan, UsageRecord, UserQuota
from quotas.services import DEFAULT_PLAN_NAME, PlanInUse, delete_plan, replay_dead_letters
from tokenlimit.limiter import LIMIT_FIELDS


class PlanForm(forms.ModelForm):
    # Lists of names, one per line (the model validators still check what comes out).
    allowed_models = LinesField(
        label=_("allowed models"), help_text=Plan._meta.get_field("allowed_models").help_text
    )
    extra_request_fields = LinesField(
        label=_("extra request fields"),
        help_text=_(
            "SGLang request fields this plan's clients may send beyond the standard ones, one "
            "per line (e.g. ignore_eos). Fields the gateway sets itself (rid, priority, "
            "cache_salt, input_ids, custom_logit_processor, …) cannot be added."
        ),
    )

    class Meta:
        model = Plan
        fields = (
            "name", "description", *LIMIT_FIELDS, "allowed_models", "extra_request_fields",
            "priority", "isolate_prefix_cache", "fair_share_weight", "max_queue_seconds",
            "self_service_keys", "max_keys_per_user",
        )  # fmt: skip


def _names(values: list[str] | None) -> str:
    return ", ".join(values or []) or "-"


@admin.register(Plan)
class PlanAdmin(AuditedAdmin):
    audit_action = AuditAction.PLAN_CHANGED
    audit_created_action = AuditAction.PLAN_CREATED
    form = PlanForm
    list_display = (
        "name", *LIMIT_FIELDS, "allowed_models_shown", "extra_fields_shown", "priority",
        "self_service_keys", "max_keys_per_user",
    )  # fmt: skip

    @admin.display(description=_("allowed models"))
    def allowed_models_shown(self, plan: Plan) -> str:
        return _names(plan.allowed_models) if plan.allowed_models else gettext("every model")

    @admin.display(description=_("extra request fields"))
    def extra_fields_shown(self, plan: Plan) -> str:
        return _names(plan.extra_request_fields)

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
        (
            _("When a model's server is full"),
            {"fields": ("fair_share_weight", "max_queue_seconds")},
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


class UserQuotaForm(forms.ModelForm):
    # Blank: the plan's list (None), not "every model" (an empty list).
    allowed_models = LinesField(
        blank_is_none=True,
        label=_("allowed models"),
        help_text=_("One model name or alias per line; blank: the plan's."),
    )

    class Meta:
        model = UserQuota
        fields = ("plan", "description", *LIMIT_FIELDS, "allowed_models")


class UserQuotaInline(admin.StackedInline):
    """Shown on the user page; blank limits fall back to the plan's."""

    model = UserQuota
    form = UserQuotaForm
    max_num = 1
    fields = ("plan", "description", *LIMIT_FIELDS, "allowed_models")


# The user page of accounts/admin.py, with the user's plan and limits: this layer knows them
# (accounts, below it, must not import quotas).
admin.site.unregister(User)


@admin.register(User)
class UserAdmin(accounts_admin.UserAdmin):
    inlines = (UserQuotaInline,)
    list_display = (*accounts_admin.UserAdmin.list_display, "plan_name")
    list_select_related = ("quota__plan",)
    summary_fields = (*accounts_admin.UserAdmin.summary_fields, "limits_table")

    @admin.display(description=_("plan"), ordering="quota__plan__name")
    def plan_name(self, user: User) -> str:
        quota = getattr(user, "quota", None)
        # No quota row: the default plan, as the gateway reads it.
        return quota.plan.name if quota is not None else f"({DEFAULT_PLAN_NAME})"

    @admin.display(description=_("plan and limits"))
    def limits_table(self, user: User) -> str:
        quota = UserQuota.objects.select_related("plan").filter(user=user).first()
        if quota is None:
            plan = Plan.objects.filter(name=DEFAULT_PLAN_NAME).first()
            if plan is None:
                return gettext("No plan.")
            quota = UserQuota(user=user, plan=plan)
        return limits_summary(quota)

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


def limits_summary(quota: UserQuota) -> str:
    """A user's plan and effective limits; a per-user override is bold and says the plan's."""
    effective = quota.effective_limits()
    rows = []
    for field in LIMIT_FIELDS:
        model_field = UserQuota._meta.get_field(field)
        assert isinstance(model_field, models.Field)
        value = getattr(effective, field)
        own = getattr(quota, field)
        shown = (
            format_html(
                '<b class="override">{}</b> ({})',
                intcomma(value),
                gettext("plan: %(value)s") % {"value": intcomma(getattr(quota.plan, field))},
            )
            if own is not None
            else intcomma(value)
        )
        rows.append((model_field.verbose_name, shown))
    allowed = effective.allowed_models
    rows.append(
        (
            gettext("allowed models"),
            (", ".join(allowed) if allowed else gettext("every model"))
            + (" " + gettext("(own list)") if quota.allowed_models is not None else ""),
        )
    )
    body = format_html_join("", '<tr><th>{}</th><td class="num">{}</td></tr>', rows)
    plan_url = reverse("admin:quotas_plan_change", args=[quota.plan.pk])
    return format_html(
        '<p>{}: <a href="{}" id="user-plan">{}</a></p><table class="admin-summary" '
        'id="user-limits">{}</table>',
        gettext("plan"),
        plan_url,
        quota.plan.name,
        body,
    )


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


# Which limit refused a 429 (UsageRecord.error_type, tokenlimit.limiter's names), in words.
REFUSALS = {
    "requests": _("requests per minute"),
    "tokens": _("tokens per minute"),
    "tokens_per_hour": _("tokens per hour"),
    "tokens_per_day": _("daily token quota"),
    "parallel_requests": _("too many at once"),
    "cooldown": _("cooldown"),
    "request_too_large": _("larger than a window"),
}
# The most users or keys a search term may stand for: beyond this the term is too vague to
# search the ledger by (it would become a huge IN list).
SEARCH_MATCHES_MAX = 500


def _count(value: int) -> str:
    return intcomma(value)


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    """The ledger is history: viewable, never edited here. The list keeps the columns an
    operator scans (the rest, request id included, is on each row's page)."""

    list_display = (
        "started_shown",
        "user",
        "key_prefix",
        "model_shown",
        "status_badge",
        "prompt_shown",
        "completion_shown",
        "cached_shown",
        "total_shown",
        "latency_shown",
        "refusal",
    )
    list_display_links = ("started_shown",)
    fields = (
        "request_id", "started_shown", "finished_at", "user", "api_key", "model", "endpoint",
        "status_code", "error_type", "refusal", "prompt_tokens", "completion_tokens",
        "cached_tokens", "total_shown", "estimated_prompt_tokens", "usage_source", "streamed",
        "client_disconnected", "latency_shown", "ttft_shown", "upstream",
    )  # fmt: skip
    readonly_fields = fields
    # No date_hierarchy: it runs DISTINCT date queries over the whole table. The date filter
    # below only adds a range condition that the started_at index serves.
    list_filter = (
        StatusFilter,
        "streamed",
        "usage_source",
        ("started_at", admin.DateFieldListFilter),
    )
    # Searched by get_search_results below; listed here so that the admin shows the box.
    search_fields = ("request_id", "user__username", "api_key__prefix")
    search_help_text = _("Part of a username, a key prefix (sk-…) or an exact request id.")
    list_select_related = ("user", "api_key")
    ordering = ("-started_at",)
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # facet counts would scan the table per filter choice

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        # A row's page shows its user and key: joined, not fetched one by one.
        return super().get_queryset(request).select_related("user", "api_key__user")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        # The small tables (users, keys) are searched loosely and resolved to ids first; the
        # ledger is then read by index only: request_id (unique), user_id, api_key_id. A
        # LIKE or an OR across joins on the ledger itself would scan it.
        term = search_term.strip().rstrip("…").strip()[:64]
        if not term:
            return queryset, False
        user_ids = list(
            User.objects.filter(username__icontains=term).values_list("pk", flat=True)[
                :SEARCH_MATCHES_MAX
            ]
        )
        key_ids: list[int] = []
        if len(term) >= 4:  # "sk-" alone would match every key
            key_ids = list(
                ApiKey.objects.filter(prefix__startswith=term).values_list("pk", flat=True)[
                    :SEARCH_MATCHES_MAX
                ]
            )
        condition = Q(request_id=term) | Q(user_id__in=user_ids) | Q(api_key_id__in=key_ids)
        return queryset.filter(condition), False

    @admin.display(description=_("started (KST)"), ordering="started_at")
    def started_shown(self, record: UsageRecord) -> str:
        return date_format(timezone.localtime(record.started_at), "Y-m-d H:i:s")

    @admin.display(description=_("API key"))
    def key_prefix(self, record: UsageRecord) -> str:
        # No FK constraint: a deleted key joins as None.
        return f"{record.api_key.prefix}…" if record.api_key is not None else "-"

    @admin.display(description=_("model"), ordering="model")
    def model_shown(self, record: UsageRecord) -> str:
        # "Qwen/Qwen2.5-7B-Instruct" shows as its last part; the whole name is the tooltip.
        short = record.model.rsplit("/", 1)[-1]
        return format_html('<span title="{}">{}</span>', record.model, short or "-")

    @admin.display(description=_("status"), ordering="status_code")
    def status_badge(self, record: UsageRecord) -> str:
        code = record.status_code
        if 200 <= code < 300:
            return badge(gettext("ok"), "ok")
        if code == 429:
            return badge(gettext("rate limited"), "warn")
        return badge(gettext("error %(code)d") % {"code": code}, "bad")

    @admin.display(description=_("prompt"), ordering="prompt_tokens")
    def prompt_shown(self, record: UsageRecord) -> str:
        return _count(record.prompt_tokens)

    @admin.display(description=_("completion"), ordering="completion_tokens")
    def completion_shown(self, record: UsageRecord) -> str:
        return _count(record.completion_tokens)

    @admin.display(description=_("cached"), ordering="cached_tokens")
    def cached_shown(self, record: UsageRecord) -> str:
        return _count(record.cached_tokens)

    @admin.display(description=_("total"))
    def total_shown(self, record: UsageRecord) -> str:
        return _count(record.total_tokens)

    @admin.display(description=_("latency"), ordering="upstream_latency_ms")
    def latency_shown(self, record: UsageRecord) -> str:
        return milliseconds(record.upstream_latency_ms)

    @admin.display(description=_("time to first token"), ordering="time_to_first_token_ms")
    def ttft_shown(self, record: UsageRecord) -> str:
        return milliseconds(record.time_to_first_token_ms)

    @admin.display(description=_("refused by"))
    def refusal(self, record: UsageRecord) -> str:
        if record.status_code != 429:
            return ""
        label = REFUSALS.get(record.error_type)
        return str(label) if label is not None else record.error_type or "-"


def milliseconds(value: float | None) -> str:
    """1258.94358 → "1,258.9 ms"; None → "-"."""
    if value is None:
        return "-"
    return f"{number_format(round(value, 1), 1, force_grouping=True)} ms"


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
