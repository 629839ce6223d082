"""Every change to plans, quotas and the ledger goes through these functions."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.translation import gettext, ngettext

from accounts.models import ApiKey, AuditAction
from accounts.services import (
    KEY_LIMIT_FIELDS,
    changes,
    check_credential_name,
    check_expiry,
    create_api_key,
    record_audit,
    revoke_api_keys,
    validated_changes,
)
from quotas.models import LedgerDeadLetter, Plan, UsageRecord, UserQuota
from quotas.request_policy import RequestAccess, user_cache_salt
from tokenlimit.ledger_rows import (
    API_KEY_ID,
    FINISHED_AT,
    LEDGER_COLUMNS,
    STARTED_AT,
    BadRow,
    clean_row,
    request_id_of,
    text,
)
from tokenlimit.limiter import LIMIT_FIELDS, Limits

log = logging.getLogger(__name__)
DEFAULT_PLAN_NAME = "default"
NO_EXTRAS = RequestAccess()


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What the gateway caches for one key hash: who it is and what they may do."""

    key_id: int
    user_id: int
    username: str
    limits: Limits
    key_limits: Limits | None  # the key's own tighter limits, if it has any
    expires_at: float | None  # epoch seconds: compared on every request, so no datetime maths
    revoked: bool
    access: RequestAccess = NO_EXTRAS

    def is_usable_now(self) -> bool:
        return not self.revoked and (self.expires_at is None or self.expires_at > time.time())


def default_plan() -> Plan:
    plan, _ = Plan.objects.get_or_create(name=DEFAULT_PLAN_NAME)
    return plan


def set_user_quota(
    user: User,
    plan: Plan,
    *,
    actor: User | None,
    actor_label: str | None = None,
    description: str | None = None,
    **overrides: Any,
) -> tuple[UserQuota, bool]:
    """Put a user on a plan with optional overrides; returns (quota, changed). A change is
    audited (the changed fields, old and new) in the same transaction; no change, no row."""
    unknown = set(overrides) - set(LIMIT_FIELDS) - {"allowed_models"}
    if unknown:
        raise ValueError(f"unknown quota fields: {sorted(unknown)}")
    wanted: dict[str, Any] = dict(overrides)
    if description is not None:
        wanted["description"] = description
    with transaction.atomic():
        quota = UserQuota.objects.select_related("plan").filter(user=user).first()
        old_plan = quota.plan if quota is not None else None
        if quota is None:
            quota = UserQuota(user=user, plan=plan)
        details = changes({field: getattr(quota, field) for field in wanted}, wanted)
        if old_plan is None or old_plan.pk != plan.pk:
            # Plans by name: an id means nothing to whoever reads the audit log.
            old_name = old_plan.name if old_plan is not None else None
            details = {"plan": {"old": old_name, "new": plan.name}, **details}
        if details:
            quota.plan = plan
            for field in details.keys() - {"plan"}:
                setattr(quota, field, wanted[field])
            quota.save()
            record_audit(actor, AuditAction.QUOTA_CHANGED, user, details, actor_label)
    return quota, bool(details)


def load_key_grant(key_hash: str) -> KeyGrant | None:
    """One query: the key, its user and the user's quota and plan (None if no such key)."""
    key = (
        ApiKey.objects.select_related("user", "user__quota", "user__quota__plan")
        .filter(key_hash=key_hash)
        .first()
    )
    if key is None:
        return None
    quota = getattr(key.user, "quota", None)
    plan = quota.plan if quota is not None else default_plan()
    limits = quota.effective_limits() if quota is not None else plan_limits(plan)
    return KeyGrant(
        key_id=key.pk,
        user_id=key.user_id,
        username=key.user.get_username(),
        limits=limits,
        key_limits=key_limits(key, limits),
        expires_at=key.expires_at.timestamp() if key.expires_at else None,
        revoked=key.revoked_at is not None or not key.user.is_active,
        access=plan_access(plan, key.user_id),
    )


def plan_access(plan: Plan, user_id: int) -> RequestAccess:
    salt = user_cache_salt(settings.SECRET_KEY, user_id) if plan.isolate_prefix_cache else None
    return RequestAccess(
        extra_fields=frozenset(plan.extra_request_fields or ()),
        priority=plan.priority,
        cache_salt=salt,
        fair_share_weight=plan.fair_share_weight,
        max_queue_seconds=plan.max_queue_seconds,
    )


def key_limits(key: ApiKey, user_limits: Limits) -> Limits | None:
    """The key's own limits (0 = none in that window), or None if it has none of its own."""
    values: dict[str, int | None] = {field: getattr(key, field) for field in KEY_LIMIT_FIELDS}
    if all(v is None for v in values.values()):
        return None
    return Limits(
        requests_per_minute=values["requests_per_minute"] or 0,
        tokens_per_minute=values["tokens_per_minute"] or 0,
        tokens_per_hour=values["tokens_per_hour"] or 0,
        tokens_per_day=values["tokens_per_day"] or 0,
        cooldown_minutes=user_limits.cooldown_minutes,
        max_parallel_requests=values["max_parallel_requests"] or 0,
    )


def plan_limits(plan: Plan) -> Limits:
    return Limits(
        **{field: getattr(plan, field) for field in LIMIT_FIELDS},
        allowed_models=tuple(plan.allowed_models or ()),
    )


# What a bad row (not a down database) raises: such a row is dead-lettered, the rest written.
# ProgrammingError is not here: a missing column is a deploy in progress, and rows wait for it.
POISON = (DataError, IntegrityError, ValueError, TypeError, OverflowError)
RAW_LIMIT = 64 * 1024  # characters of a dead letter's raw event kept


@dataclass(frozen=True, slots=True)
class DeadRow:
    raw: Any  # what arrived: a row, or the text that was not one
    error: str


def parse_row(payload: bytes | str) -> Any:
    """A transported row (JSON), or a DeadRow holding the text if it is not JSON."""
    try:
        return json.loads(payload)
    except ValueError as exc:
        shown = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
        return DeadRow(shown, f"not JSON: {exc}")


def record_usage_lines(lines: Sequence[bytes | str], source: str) -> int:
    """Rows as transported (JSON text): `record_usage_rows`, with what is not JSON dead-lettered."""
    parsed = [parse_row(line) for line in lines]
    rows = [row for row in parsed if not isinstance(row, DeadRow)]
    return record_usage_rows(rows, source, [row for row in parsed if isinstance(row, DeadRow)])


def record_usage_rows(
    raw_rows: Sequence[Any], source: str, unreadable: Sequence[DeadRow] = ()
) -> int:
    """Write a batch of ledger rows and the keys' last use, in one transaction.

    Rows are in LEDGER_COLUMNS order with started_at/finished_at as epoch seconds (the form
    the spool and the Redis stream carry), cleaned here again (tokenlimit/ledger_rows.py). A
    request id already present is skipped, so a replayed batch inserts nothing twice. If the
    batch fails on its data, each row is tried alone and the ones that still fail go to the
    dead letters (`source` says which path they came by); a database that is down raises, and
    the caller keeps the batch. `unreadable` are entries that were not even JSON: they are
    dead-lettered in the same transaction. Returns how many rows were dead-lettered.
    """
    rows: list[tuple[Any, ...]] = []
    dead: list[DeadRow] = list(unreadable)
    for raw in raw_rows:
        try:
            rows.append(clean_row(raw, time.time))
        except BadRow as exc:
            dead.append(DeadRow(raw, str(exc)))
    with transaction.atomic():
        try:
            with transaction.atomic():
                _insert(rows)
            written = rows
        except POISON:
            written, failed = _insert_one_by_one(rows)
            dead.extend(failed)
        _touch_keys(written)
        bury(dead, source)
    return len(dead)


def _insert(rows: list[tuple[Any, ...]]) -> None:
    # Raw SQL rather than bulk_create: building model instances cost ~45 ms of CPU per 1,000
    # rows. executemany: parsed once, then pipelined by psycopg 3 (one multi-row VALUES
    # statement cost more, in psycopg's query conversion, than it saved in round trips).
    if not rows:
        return
    adapt = connection.ops.adapt_datetimefield_value
    params = [
        (
            *row[:STARTED_AT],
            adapt(_aware(row[STARTED_AT])),
            adapt(_aware(row[FINISHED_AT])),
            *row[FINISHED_AT + 1 :],
        )
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(LEDGER_INSERT_SQL, params)


def _insert_one_by_one(
    rows: list[tuple[Any, ...]],
) -> tuple[list[tuple[Any, ...]], list[DeadRow]]:
    written, dead = [], []
    for row in rows:
        try:
            with transaction.atomic():  # a savepoint: one failure does not end the transaction
                _insert([row])
            written.append(row)
        except POISON as exc:
            dead.append(DeadRow(row, f"{exc.__class__.__name__}: {exc}"))
    return written, dead


def _touch_keys(rows: list[tuple[Any, ...]]) -> None:
    from accounts.services import touch_last_used

    last_used: dict[int, float] = {}
    for row in rows:
        key_id = row[API_KEY_ID]
        if key_id is not None:
            last_used[key_id] = max(row[STARTED_AT], last_used.get(key_id, 0.0))
    touch_last_used({key_id: _aware(when) for key_id, when in last_used.items()})


def bury(dead: list[DeadRow], source: str) -> None:
    """Keep rows that cannot be written, with why, for an operator to look at and replay."""
    if not dead:
        return
    for row in dead:
        log.error("ledger: dead-lettered %r: %s", request_id_of(row.raw), row.error[:300])
    LedgerDeadLetter.objects.bulk_create(
        LedgerDeadLetter(
            source=text(source, 20),
            request_id=request_id_of(row.raw),
            # ASCII JSON: a NUL or a lone surrogate is escaped, so the letter itself always fits.
            raw=json.dumps(row.raw, ensure_ascii=True, default=repr)[:RAW_LIMIT],
            error=text(row.error, 2000),
        )
        for row in dead
    )


def replay_dead_letters(actor: User, letters: QuerySet[LedgerDeadLetter]) -> tuple[int, int]:
    """Write dead-lettered events again (after a fix); returns (replayed, still failing).

    Each letter that is written is marked with who replayed it and when; one that fails again
    keeps its place with the new error.
    """
    replayed = failed = 0
    for letter in letters.filter(replayed_at__isnull=True).order_by("pk"):
        try:
            row = clean_row(json.loads(letter.raw), time.time)
            with transaction.atomic():
                _insert([row])
                _touch_keys([row])
        except (BadRow, *POISON) as exc:
            letter.error = text(f"{exc.__class__.__name__}: {exc}", 2000)
            letter.save(update_fields=["error"])
            failed += 1
            continue
        letter.replayed_at = timezone.now()
        letter.replayed_by = actor
        letter.save(update_fields=["replayed_at", "replayed_by"])
        log.info("ledger: %s replayed dead letter %s", actor, letter.request_id or letter.pk)
        replayed += 1
    return replayed, failed


def _aware(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


LEDGER_INSERT_SQL = (
    f"INSERT INTO {UsageRecord._meta.db_table} ({', '.join(LEDGER_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(LEDGER_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING"
)


# --- Plans --------------------------------------------------------------------------------------

# Every field an operator may set on a plan (all but the id), in the model's order.
PLAN_FIELDS = tuple(
    field.name for field in Plan._meta.concrete_fields if field.editable and not field.primary_key
)


class PlanInUse(Exception):
    """delete_plan refused: users are on the plan (or it is the default plan, which every user
    without a plan of their own is on)."""

    def __init__(self, message: str, users: int) -> None:
        super().__init__(message)
        self.users = users


def _check_plan_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - set(PLAN_FIELDS)
    if unknown:
        raise ValueError(f"unknown plan fields: {sorted(unknown)}")


def _save_plan(plan: Plan, update_fields: list[str] | None = None) -> None:
    """Save, turning a name taken since full_clean checked it into the same ValidationError."""
    try:
        with transaction.atomic():
            plan.save(update_fields=update_fields)
    except IntegrityError:
        raise ValidationError({"name": plan.unique_error_message(Plan, ("name",))}) from None


def create_plan(
    *, actor: User | None, actor_label: str | None = None, name: str, **fields: Any
) -> Plan:
    """A new plan, validated by the model (ValidationError by field); audited with every value."""
    _check_plan_fields(fields)
    plan = Plan(name=name, **fields)
    plan.full_clean()
    with transaction.atomic():
        _save_plan(plan)
        record_audit(actor, AuditAction.PLAN_CREATED, plan, _plan_facts(plan), actor_label)
    return plan


def update_plan(
    plan: Plan, *, actor: User | None, actor_label: str | None = None, **fields: Any
) -> bool:
    """Change any of PLAN_FIELDS, validated by the model (ValidationError by field); returns
    whether anything changed (nothing is written if not: neither the plan nor an audit row).

    Compared with the row as stored (locked), not with `plan` as the caller loaded it, so the
    audit's "old" values are the real ones; `plan` is brought up to date afterwards. The
    gateway's key cache picks up new limits within GATEWAY_KEY_CACHE_SECONDS."""
    _check_plan_fields(fields)
    with transaction.atomic():
        current = Plan.objects.select_for_update().get(pk=plan.pk)
        if current.name == DEFAULT_PLAN_NAME and fields.get("name", current.name) != current.name:
            # default_plan() finds it by name: renamed, a fresh one would appear in its place.
            raise ValidationError(
                {
                    "name": gettext(
                        "The default plan keeps its name: users without a plan are on it."
                    )
                }
            )
        edited, details = validated_changes(current, fields)
        if not details:
            return False
        _save_plan(edited, update_fields=list(details))
        record_audit(actor, AuditAction.PLAN_CHANGED, edited, details, actor_label)
    for field in details:
        setattr(plan, field, getattr(edited, field))
    return True


def set_plan_limits(
    plan: Plan, *, actor: User | None, actor_label: str | None = None, **limits: int
) -> bool:
    """update_plan for the limit fields alone (import_config's default limits)."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown plan limits: {sorted(unknown)}")
    return update_plan(plan, actor=actor, actor_label=actor_label, **limits)


def delete_plan(plan: Plan, *, actor: User | None, actor_label: str | None = None) -> None:
    """Delete a plan nobody is on (PlanInUse otherwise), audited with what it was."""
    with transaction.atomic():
        # Locked: set_user_quota's insert of a quota on this plan waits for the foreign key's
        # row lock, and then fails, instead of racing with the count.
        locked = Plan.objects.select_for_update().get(pk=plan.pk)
        if locked.name == DEFAULT_PLAN_NAME:
            users = User.objects.filter(quota__isnull=True).count() + locked.quotas.count()
            raise PlanInUse(
                gettext(
                    "The default plan cannot be deleted: every user without a plan of their "
                    "own is on it."
                ),
                users,
            )
        users = locked.quotas.count()
        if users:
            message = ngettext(
                "%(count)d user is on this plan: move them to another plan first.",
                "%(count)d users are on this plan: move them to another plan first.",
                users,
            )
            raise PlanInUse(message % {"count": users}, users)
        # Recorded before the row goes: the event keeps the plan's id and values.
        record_audit(actor, AuditAction.PLAN_DELETED, locked, _plan_facts(locked), actor_label)
        locked.delete()


def _plan_facts(plan: Plan) -> dict[str, Any]:
    return {field: getattr(plan, field) for field in PLAN_FIELDS}


def user_plan(user: User) -> Plan:
    """The plan the user is on: their quota's, else the default plan."""
    quota = _quota_of(user)
    return quota.plan if quota is not None else default_plan()


def effective_limits_for(user: User) -> Limits:
    """The limits the gateway applies to the user: their plan's with their own overrides."""
    quota = _quota_of(user)
    return quota.effective_limits() if quota is not None else plan_limits(default_plan())


def _quota_of(user: User) -> UserQuota | None:
    """The user's quota with its plan: one query per user instance, then cached on it as
    `user.quota` would be (a request asking for both the plan and the limits pays once)."""
    relation = UserQuota._meta.get_field("user").remote_field
    if relation.is_cached(user):
        cached = relation.get_cached_value(user)
        return cached if isinstance(cached, UserQuota) else None
    quota = UserQuota.objects.select_related("plan").filter(user=user).first()
    relation.set_cached_value(user, quota)
    return quota


# --- A user's own API keys ----------------------------------------------------------------------


class KeyPolicyError(Exception):
    """A user's own key creation or revocation refused by their plan; `code` says why."""

    SELF_SERVICE_OFF = "self_service_off"
    TOO_MANY_KEYS = "key_limit_reached"
    INACTIVE_USER = "inactive_user"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def create_own_api_key(
    user: User, *, name: str, expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """A key the user makes for themselves (and is recorded as its actor), within their plan's
    self-service policy (KeyPolicyError otherwise); the raw key is returned here only once."""
    name = check_credential_name(name)
    expires_at = check_expiry(expires_at)
    with transaction.atomic():
        # The user's row locked: two concurrent creates count one after the other, so together
        # they cannot exceed the plan's maximum.
        locked = User.objects.select_for_update().get(pk=user.pk)
        if not locked.is_active:
            raise KeyPolicyError(
                gettext("This account is deactivated."), KeyPolicyError.INACTIVE_USER
            )
        plan = user_plan(locked)
        _require_self_service(plan)
        limit = plan.max_keys_per_user
        if limit and _active_keys(locked).count() >= limit:
            message = ngettext(
                "Your plan allows %(count)d active API key: revoke one first.",
                "Your plan allows %(count)d active API keys: revoke one first.",
                limit,
            )
            raise KeyPolicyError(message % {"count": limit}, KeyPolicyError.TOO_MANY_KEYS)
        return create_api_key(locked, actor=locked, name=name, expires_at=expires_at)


def revoke_own_api_key(user: User, key_id: int) -> bool:
    """Revoke one of the user's own keys, recorded with the user as the actor. False if no key
    of theirs has that id (someone else's, or none: the caller answers "not found" to both);
    True if it is theirs and now revoked (also when it already was)."""
    if isinstance(key_id, bool) or not isinstance(key_id, int) or not 0 < key_id < 2**63:
        return False
    _require_self_service(user_plan(user))
    with transaction.atomic():
        key = ApiKey.objects.select_for_update().filter(pk=key_id, user=user).first()
        if key is None:
            return False
        if key.revoked_at is None:
            revoke_api_keys([key], actor=user)
    return True


def _require_self_service(plan: Plan) -> None:
    if not plan.self_service_keys:
        raise KeyPolicyError(
            gettext("Your plan does not let you manage your own API keys; ask an operator."),
            KeyPolicyError.SELF_SERVICE_OFF,
        )


def _active_keys(user: User) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user=user).active()
