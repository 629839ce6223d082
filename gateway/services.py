"""Every change to served models goes through these functions."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Avg, Count, F, OuterRef, QuerySet, Subquery
from django.db.models.functions import Abs
from django.utils.translation import gettext

from accounts.models import AuditAction
from accounts.services import changes, record_audit, validated_changes
from gateway.models import ServedModel, TokenizerCheck, normalize_upstream_url
from quotas.models import UsageRecord

# What import_config sets (set_served_model).
SERVED_MODEL_FIELDS = (
    "aliases",
    "upstream_url",
    "tokenizer",
    "context_length",
    "korean_factor",
    "request_timeout_seconds",
    "is_active",
    "description",
)
# Every field an operator may set (save_served_model), in the model's order.
EDITABLE_MODEL_FIELDS = tuple(
    field.name
    for field in ServedModel._meta.concrete_fields
    if field.editable and not field.primary_key
)
# The bounds import_config holds a server file to, for every other way in too.
MAX_KOREAN_FACTOR = 10.0
MAX_REQUEST_TIMEOUT_SECONDS = 86400.0
MAX_ALIASES = 100
MAX_LEARNT_OFFSET = 4096  # a larger "offset" is a wrong tokenizer, not a template's preamble
IMPORT_LABEL = "import_config"


def save_served_model(
    *,
    actor: User | None,
    actor_label: str | None = None,
    model: ServedModel | None,
    **fields: Any,
) -> tuple[ServedModel, bool]:
    """Create a served model (model=None; `fields` name it) or change `model`; returns (model,
    changed), changed being True for a new one. Validated by the model and the bounds above
    (ValidationError by field). Its aliases are taken from any other model that had them, in
    the same transaction, each loss audited too; an alias that is another model's own name is
    refused. No change, nothing written (no audit row)."""
    unknown = set(fields) - set(EDITABLE_MODEL_FIELDS)
    if unknown:
        raise ValueError(f"unknown served model fields: {sorted(unknown)}")
    return _save(actor, actor_label, model, fields, take_aliases=True)


def set_served_model(
    name: str, *, actor: User | None = None, actor_label: str = IMPORT_LABEL, **fields: Any
) -> tuple[ServedModel, bool, bool]:
    """Create or update the served model `name` (import_config); returns (model, created,
    changed). Aliases are left to take_model_aliases, which the import calls next so that it
    can name the file and entry of a clash."""
    unknown = set(fields) - set(SERVED_MODEL_FIELDS)
    if unknown:
        raise ValueError(f"unknown served model fields: {sorted(unknown)}")
    existing = ServedModel.objects.filter(name=name).first()
    wanted = fields if existing is not None else {"name": name, **fields}
    model, changed = _save(actor, actor_label, existing, wanted, take_aliases=False)
    return model, existing is None, changed


def delete_served_model(
    model: ServedModel, *, actor: User | None, actor_label: str | None = None
) -> None:
    """Delete a served model, audited with what it was. Its usage history stays (the ledger
    names models by name); clients asking for it get "model not found" once the gateway's model
    cache refreshes."""
    with transaction.atomic():
        locked = ServedModel.objects.select_for_update().get(pk=model.pk)
        # Recorded before the row goes: the event keeps the model's id and values.
        record_audit(actor, AuditAction.MODEL_DELETED, locked, _facts(locked), actor_label)
        locked.delete()


def take_model_aliases(
    model: ServedModel, *, actor: User | None = None, actor_label: str | None = None
) -> list[ServedModel]:
    """Remove `model`'s aliases from every other model, so that each name means one model; each
    model that loses one gets an audit row. Call it in the transaction that set the aliases.

    Returns the models that lost an alias. An alias that is another model's own name cannot be
    taken (clients already use that name): ValueError.
    """
    others = list(ServedModel.objects.exclude(pk=model.pk).select_for_update())
    clashes = sorted(other.name for other in others if other.name in model.aliases)
    if clashes:
        raise ValueError(
            gettext("%(names)s is already the name of another served model")
            % {"names": ", ".join(clashes)}
        )
    changed = []
    for other in others:
        kept = [alias for alias in other.aliases or [] if alias not in model.aliases]
        if kept != (other.aliases or []):
            details = changes({"aliases": other.aliases}, {"aliases": kept})
            other.aliases = kept
            other.save(update_fields=["aliases"])
            record_audit(actor, AuditAction.MODEL_CHANGED, other, details, actor_label)
            changed.append(other)
    return changed


def _save(
    actor: User | None,
    actor_label: str | None,
    model: ServedModel | None,
    fields: dict[str, Any],
    *,
    take_aliases: bool,
) -> tuple[ServedModel, bool]:
    if "aliases" in fields:
        fields = {**fields, "aliases": _checked_aliases(fields["aliases"])}
    if isinstance(fields.get("upstream_url"), str):
        fields = {**fields, "upstream_url": normalize_upstream_url(fields["upstream_url"])}
    with transaction.atomic():
        if model is None:
            edited = ServedModel(**fields)
            edited.full_clean()
            details = _facts(edited)
            action = AuditAction.MODEL_CREATED
        else:
            current = ServedModel.objects.select_for_update().get(pk=model.pk)
            edited, details = validated_changes(current, fields)
            action = AuditAction.MODEL_CHANGED
        # Only what this call sets: a value stored earlier does not block an unrelated change.
        _check_bounds(edited, fields)
        if not details:
            return model or edited, False
        _write(edited, None if model is None else list(details))
        if take_aliases and edited.aliases and (model is None or "aliases" in details):
            try:
                take_model_aliases(edited, actor=actor, actor_label=actor_label)
            except ValueError as exc:
                raise ValidationError({"aliases": str(exc)}) from None
        record_audit(actor, action, edited, details, actor_label)
    if model is None:
        return edited, True
    for field in details:
        setattr(model, field, getattr(edited, field))
    return model, True


def _write(model: ServedModel, update_fields: list[str] | None) -> None:
    """Save, turning a name taken since full_clean checked it into the same ValidationError."""
    try:
        with transaction.atomic():
            model.save(update_fields=update_fields)
    except IntegrityError:
        taken = model.unique_error_message(ServedModel, ("name",))
        raise ValidationError({"name": taken}) from None


def _checked_aliases(aliases: object) -> list[str]:
    """A list of distinct, non-empty names no longer than a model's name (ValidationError on
    "aliases" otherwise); the JSON column itself would take anything."""
    limit = ServedModel._meta.get_field("name").max_length or 200
    if (
        not isinstance(aliases, list)
        or len(aliases) > MAX_ALIASES
        or not all(isinstance(alias, str) and 0 < len(alias) <= limit for alias in aliases)
    ):
        raise ValidationError({"aliases": gettext('Enter a list of names, e.g. ["korean-qwen"].')})
    return list(dict.fromkeys(aliases))


def _check_bounds(model: ServedModel, fields: dict[str, Any]) -> None:
    errors: dict[str, str] = {}
    if "context_length" in fields and model.context_length < 1:
        errors["context_length"] = gettext("Enter a whole number of at least 1.")
    factor = model.korean_factor
    if (
        "korean_factor" in fields
        and factor is not None
        and not (math.isfinite(factor) and 0 < factor <= MAX_KOREAN_FACTOR)
    ):
        errors["korean_factor"] = gettext(
            "Enter a number above 0 and at most %(maximum)s, or leave it blank."
        ) % {"maximum": MAX_KOREAN_FACTOR}
    timeout = model.request_timeout_seconds
    if "request_timeout_seconds" in fields and not (
        math.isfinite(timeout) and 0 < timeout <= MAX_REQUEST_TIMEOUT_SECONDS
    ):
        errors["request_timeout_seconds"] = gettext(
            "Enter a number above 0 and at most %(maximum)s."
        ) % {"maximum": MAX_REQUEST_TIMEOUT_SECONDS}
    offset = model.prompt_token_offset
    if "prompt_token_offset" in fields and abs(offset) > MAX_LEARNT_OFFSET:
        errors["prompt_token_offset"] = gettext(
            "Enter a whole number between -%(maximum)s and %(maximum)s."
        ) % {"maximum": MAX_LEARNT_OFFSET}
    if errors:
        raise ValidationError(errors)


def _facts(model: ServedModel) -> dict[str, Any]:
    return {field: getattr(model, field) for field in EDITABLE_MODEL_FIELDS}


def with_prompt_reconciliation(
    models: QuerySet[ServedModel], start: datetime, end: datetime | None = None
) -> QuerySet[ServedModel]:
    """`models` annotated with the gateway's prompt count beside the upstream's over
    [start, end): `checked` (upstream-billed 200s), `differing` (of those, counted differently
    by the gateway) and `mean_gap` (their mean difference in tokens). One subquery per column
    for the whole list, never a query per model. Used by the admin's served-model list and
    the operator console."""
    billed = UsageRecord.objects.filter(
        model=OuterRef("name"), started_at__gte=start, usage_source="upstream", status_code=200
    )
    if end is not None:
        billed = billed.filter(started_at__lt=end)
    billed_by_model = billed.values("model")
    differ = billed_by_model.exclude(prompt_tokens=F("estimated_prompt_tokens"))
    gap = Abs(F("prompt_tokens") - F("estimated_prompt_tokens"))
    return models.annotate(
        checked=Subquery(billed_by_model.annotate(n=Count("pk")).values("n")[:1]),
        differing=Subquery(differ.annotate(n=Count("pk")).values("n")[:1]),
        mean_gap=Subquery(differ.annotate(g=Avg(gap)).values("g")[:1]),
    )


# --- Tokenizer self-check (gateway/self_check.py) ----------------------------------------------

SELF_CHECK_LABEL = "tokenizer self-check"
CHECKS_KEPT_PER_MODEL = 50


def record_tokenizer_check(result: Any, model: Any) -> TokenizerCheck | None:
    """Store one self-check result (a gateway.self_check.CheckResult for `model`, a ModelInfo),
    keep the newest CHECKS_KEPT_PER_MODEL, and apply a constant offset when the operator asked
    for that. None when the model is gone."""
    served = ServedModel.objects.filter(name=result.model).first()
    if served is None:
        return None
    with transaction.atomic():
        check = TokenizerCheck.objects.create(
            model=served,
            outcome=result.outcome[:20],
            counter_source=result.counter_source[:500],
            offset_seen=result.offset_seen,
            probes=result.probes,
            detail=result.detail[:500],
        )
        stale = TokenizerCheck.objects.filter(model=served).order_by("-checked_at", "-pk")
        stale_ids = list(stale.values_list("pk", flat=True)[CHECKS_KEPT_PER_MODEL:])
        if stale_ids:
            TokenizerCheck.objects.filter(pk__in=stale_ids).delete()
    if (
        result.outcome == "mismatch"
        and result.offset_seen is not None
        and model.correct_offset_automatically
    ):
        apply_learnt_offset(served, model.prompt_token_offset, result.offset_seen)
    return check


def apply_learnt_offset(served: ServedModel, seen_with: int, gap: int) -> bool:
    """Add `gap` to the prompt token offset that was in use when the check ran (`seen_with`).
    Conditional on that offset still being in place: N gateways that saw the same gap, or a
    check that ran before an admin edit, change nothing twice. Audited as a model change by
    the self-check."""
    new = seen_with + gap
    if abs(new) > MAX_LEARNT_OFFSET:
        return False
    with transaction.atomic():
        updated = ServedModel.objects.filter(pk=served.pk, prompt_token_offset=seen_with).update(
            prompt_token_offset=new
        )
        if updated:
            details = changes({"prompt_token_offset": seen_with}, {"prompt_token_offset": new})
            record_audit(None, AuditAction.MODEL_CHANGED, served, details, SELF_CHECK_LABEL)
    return bool(updated)


def with_latest_check(queryset: QuerySet[ServedModel]) -> QuerySet[ServedModel]:
    """Each model with its newest self-check's outcome, offset seen and time (one subquery
    each for the whole page, not a query per row)."""
    latest = TokenizerCheck.objects.filter(model=OuterRef("pk")).order_by("-checked_at", "-pk")
    return queryset.annotate(
        check_outcome=Subquery(latest.values("outcome")[:1]),
        check_offset=Subquery(latest.values("offset_seen")[:1]),
        check_detail=Subquery(latest.values("detail")[:1]),
        check_at=Subquery(latest.values("checked_at")[:1]),
    )


# --- The estimator's refit (tokenlimit/estimator_fit.py) ---------------------------------------

REFIT_LABEL = "estimator refit"
REFIT_WINDOW_DAYS = 7
REFIT_MAX_ROWS = 5000


def refit_estimators(now: datetime | None = None) -> dict[str, dict[str, float]]:
    """For each active model counted by the estimator: fit its correction from the ledger's
    chat rows with upstream usage since the last fit (at most a week), store it when it lowers
    the error (audited), and return what was stored by model. Gateways pick it up with their
    next catalog reload. One query for the models, one per estimating model, one write each."""
    from django.utils import timezone

    from gateway.caches import fit_pairs
    from tokenlimit import estimator_fit
    from tokenlimit.tokens import get_counter

    now = now or timezone.now()
    stored: dict[str, dict[str, float]] = {}
    for served in ServedModel.objects.filter(is_active=True):
        old = dict(served.estimator_fit or {})
        counter = get_counter(
            served.name, served.tokenizer, served.korean_factor,
            chat_template=served.chat_template,
            estimator_fit=fit_pairs(old),
        )  # fmt: skip
        if counter.chat_exact:
            continue
        since = now - timedelta(days=REFIT_WINDOW_DAYS)
        if old.get("fitted_at"):
            since = max(since, datetime.fromtimestamp(float(old["fitted_at"]), tz=UTC))
        rows = (
            UsageRecord.objects.filter(
                model=served.name, endpoint="chat/completions", usage_source="upstream",
                started_at__gte=since, estimated_prompt_tokens__gt=0, prompt_tokens__gt=0,
            )
            .order_by("-started_at")
            .values_list("estimated_prompt_tokens", "prompt_tokens")[:REFIT_MAX_ROWS]
        )  # fmt: skip
        fitted = estimator_fit.fit(list(rows))
        if fitted is None:
            continue
        scale, offset = estimator_fit.compose(
            float(old.get("scale", 1.0)), float(old.get("offset", 0.0)), fitted
        )
        value = {**fitted.as_dict(), "scale": scale, "offset": offset, "fitted_at": now.timestamp()}
        with transaction.atomic():
            ServedModel.objects.filter(pk=served.pk).update(estimator_fit=value)
            details = changes({"estimator_fit": old}, {"estimator_fit": value})
            record_audit(None, AuditAction.MODEL_CHANGED, served, details, REFIT_LABEL)
        stored[served.name] = value
    return stored
