"""Every change to plans, quotas and the ledger goes through these functions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection, transaction

from accounts.models import ApiKey
from accounts.services import KEY_LIMIT_FIELDS
from quotas.models import LIMIT_FIELDS, Limits, Plan, UsageRecord, UserQuota
from quotas.request_policy import RequestAccess, user_cache_salt

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
    user: User, plan: Plan, *, description: str | None = None, **overrides: Any
) -> tuple[UserQuota, bool]:
    """Put a user on a plan with optional overrides; returns (quota, changed)."""
    unknown = set(overrides) - set(LIMIT_FIELDS) - {"allowed_models"}
    if unknown:
        raise ValueError(f"unknown quota fields: {sorted(unknown)}")
    quota = UserQuota.objects.filter(user=user).first()
    if quota is None:
        quota = UserQuota(user=user, plan=plan)
        changed = True
    else:
        changed = quota.plan_id != plan.pk
        quota.plan = plan
    wanted: dict[str, Any] = dict(overrides)
    if description is not None:
        wanted["description"] = description
    for field, value in wanted.items():
        if getattr(quota, field) != value:
            setattr(quota, field, value)
            changed = True
    if changed:
        quota.save()
    return quota, changed


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
    limits = quota.effective_limits() if quota is not None else _plan_limits(plan)
    return KeyGrant(
        key_id=key.pk,
        user_id=key.user_id,
        username=key.user.get_username(),
        limits=limits,
        key_limits=_key_limits(key, limits),
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
    )


def _key_limits(key: ApiKey, user_limits: Limits) -> Limits | None:
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


def _plan_limits(plan: Plan) -> Limits:
    return Limits(
        **{field: getattr(plan, field) for field in LIMIT_FIELDS},
        allowed_models=tuple(plan.allowed_models or ()),
    )


# Column order of the tuples `record_usage_rows` takes.
LEDGER_COLUMNS = (
    "request_id",
    "user_id",
    "api_key_id",
    "model",
    "endpoint",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "estimated_prompt_tokens",
    "usage_source",
    "status_code",
    "error_type",
    "streamed",
    "client_disconnected",
    "started_at",
    "finished_at",
    "upstream_latency_ms",
    "time_to_first_token_ms",
)


def record_usage_rows(rows: list[tuple[Any, ...]]) -> None:
    """Write a batch of ledger rows and the keys' last use, in one transaction.

    Rows are tuples in LEDGER_COLUMNS order with started_at/finished_at as epoch seconds (the
    form the gateway queues and the Redis stream carries). A request id already present is
    skipped, so a replayed batch inserts nothing twice. Raw SQL rather than bulk_create:
    building model instances cost ~45 ms of CPU per 1,000 rows.
    """
    from accounts.services import touch_last_used

    key_at, started, finished = (
        LEDGER_COLUMNS.index("api_key_id"),
        LEDGER_COLUMNS.index("started_at"),
        LEDGER_COLUMNS.index("finished_at"),
    )
    adapt = connection.ops.adapt_datetimefield_value
    params = [
        (
            *row[:started],
            adapt(_aware(row[started])),
            adapt(_aware(row[finished])),
            *row[finished + 1 :],
        )
        for row in rows
    ]
    last_used: dict[int, float] = {}
    for row in rows:
        if row[key_at] is not None:
            last_used[row[key_at]] = max(row[started], last_used.get(row[key_at], 0.0))
    # executemany: parsed once, then pipelined by psycopg 3 (one multi-row VALUES statement
    # cost more, in psycopg's query conversion, than it saved in round trips).
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.executemany(LEDGER_INSERT_SQL, params)
        touch_last_used({key_id: _aware(when) for key_id, when in last_used.items()})


def _aware(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


LEDGER_INSERT_SQL = (
    f"INSERT INTO {UsageRecord._meta.db_table} ({', '.join(LEDGER_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(LEDGER_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING"
)


def set_plan_limits(plan: Plan, **limits: int) -> bool:
    """Set some of a plan's limits; returns whether anything changed (nothing is written if not)."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown plan limits: {sorted(unknown)}")
    changed = [field for field, value in limits.items() if getattr(plan, field) != value]
    for field in changed:
        setattr(plan, field, limits[field])
    if changed:
        plan.save(update_fields=changed)
    return bool(changed)
