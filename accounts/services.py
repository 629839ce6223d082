"""Every change to users and API keys goes through these functions."""

from __future__ import annotations

import hashlib
import math
import secrets
import string
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.contrib.auth.models import User
from django.db import models, transaction
from django.utils import timezone
from django.utils.translation import gettext

from accounts.models import ApiKey, AuditAction, AuditEvent

KEY_PREFIX = "sk-"
# 32 random bytes = 256 bits, above the 192 the design asks for.
KEY_RANDOM_BYTES = 32
VISIBLE_PREFIX_LENGTH = 11

# Published in README and config/: fine for a first try, never for a real deployment.
QUICK_START_KEYS = frozenset(
    {
        "sk-admin-korean-key-123",
        "sk-dev-korean-key-456",
        "sk-user1-korean-key-def",
        "sk-dev1-korean-key-789",
        "sk-test-korean-key-stu",
    }
)


# An imported (operator-chosen) key must hide at least this many random bits beyond the part the
# admin shows, as a generated key does (256).
MIN_KEY_BITS = 128
MIN_DISTINCT_CHARACTERS = 12


def hidden_key_bits(raw_key: str) -> float:
    """The most random bits the key's hidden part (after the visible prefix) can carry: its
    length times log2 of the alphabet its characters come from. Only an upper bound for keys a
    person made up, hence also MIN_DISTINCT_CHARACTERS."""
    body = raw_key.removeprefix(KEY_PREFIX)
    alphabet = _alphabet_size(body)
    hidden = raw_key[VISIBLE_PREFIX_LENGTH:]
    return len(hidden) * math.log2(alphabet) if alphabet > 1 else 0.0


def _alphabet_size(text: str) -> int:
    if text.isdigit():
        return 10
    if all(char in string.hexdigits for char in text):
        return 16
    size = 26 * any(char in string.ascii_lowercase for char in text)
    size += 26 * any(char in string.ascii_uppercase for char in text)
    size += 10 * any(char in string.digits for char in text)
    size += 2 * any(char in "-_" for char in text)
    size += 32 * any(not (char.isascii() and (char.isalnum() or char in "-_")) for char in text)
    return size


def weak_key_reason(raw_key: str) -> str | None:
    """Why an operator-chosen key is too easy to guess, or None if it is strong enough."""
    if hidden_key_bits(raw_key) < MIN_KEY_BITS or len(set(raw_key)) < MIN_DISTINCT_CHARACTERS:
        return gettext(
            "an API key needs at least %(bits)d random bits beyond its first %(shown)d "
            "characters (e.g. sk- and 32 random letters and digits); generate one with: "
            "python -c \"import secrets; print('sk-' + secrets.token_urlsafe(32))\""
        ) % {"bits": MIN_KEY_BITS, "shown": VISIBLE_PREFIX_LENGTH}
    return None


def hash_key(raw_key: str) -> str:
    # Keys carry 256 random bits, so a fast unsalted hash is safe and lets the gateway look a
    # key up by equality; imported keys are hashed the same way.
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def visible_prefix(raw_key: str) -> str:
    return raw_key[:VISIBLE_PREFIX_LENGTH]


def generate_raw_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def create_api_key(
    user: User,
    *,
    actor: User | None,
    actor_label: str | None = None,
    name: str = "",
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a new random key; the raw key is returned here and never again (nor audited)."""
    raw_key = generate_raw_key()
    with transaction.atomic():
        key = ApiKey.objects.create(
            user=user,
            name=name,
            prefix=visible_prefix(raw_key),
            key_hash=hash_key(raw_key),
            expires_at=expires_at,
        )
        record_audit(actor, AuditAction.KEY_CREATED, key, _created_details(key), actor_label)
    return key, raw_key


def import_api_key(
    user: User, raw_key: str, name: str = "", *, actor: User | None, actor_label: str | None = None
) -> tuple[ApiKey, bool]:
    """Store a key given in configuration; returns (key, changed). Re-importing is a no-op."""
    key_hash = hash_key(raw_key)
    with transaction.atomic():
        existing = ApiKey.objects.select_related("user").filter(key_hash=key_hash).first()
        if existing is None:
            key = ApiKey.objects.create(
                user=user,
                name=name,
                prefix=visible_prefix(raw_key),
                key_hash=key_hash,
                imported=True,
            )
            record_audit(actor, AuditAction.KEY_CREATED, key, _created_details(key), actor_label)
            return key, True
        if existing.user_id != user.pk or (name and existing.name != name):
            before = {"user": existing.user.get_username(), "name": existing.name}
            existing.user = user
            existing.name = name or existing.name
            existing.save(update_fields=["user", "name"])
            after = {"user": user.get_username(), "name": existing.name}
            details = changes(before, after)
            record_audit(actor, AuditAction.KEY_CHANGED, existing, details, actor_label)
            return existing, True
    return existing, False


def _created_details(key: ApiKey) -> dict[str, Any]:
    # The prefix is what the admin shows anyway; the raw key and its hash never go here.
    return {
        "user": key.user.get_username(),
        "name": key.name,
        "prefix": key.prefix,
        "expires_at": _shown(key.expires_at),
        "imported": key.imported,
    }


def revoke_api_keys(
    keys: list[ApiKey] | None = None,
    *,
    key_ids: list[int] | None = None,
    actor: User | None,
    actor_label: str | None = None,
) -> int:
    """Revoke keys, one audit row per key revoked now; returns how many. The gateway's key cache
    drops them within GATEWAY_KEY_CACHE_SECONDS."""
    ids = [k.pk for k in keys or []] + list(key_ids or [])
    with transaction.atomic():
        # Locked: a concurrent revoke waits, then finds them revoked, so each key is audited once.
        active = list(
            ApiKey.objects.select_for_update()
            .filter(pk__in=ids, revoked_at__isnull=True)
            .only("pk", "prefix")
            .order_by("pk")
        )
        now = timezone.now()
        ApiKey.objects.filter(pk__in=[key.pk for key in active]).update(revoked_at=now)
        details = changes({"revoked_at": None}, {"revoked_at": now})
        AuditEvent.objects.bulk_create(
            audit_event(actor, AuditAction.KEY_REVOKED, key, details, actor_label) for key in active
        )
    return len(active)


def touch_last_used(last_used: dict[int, datetime]) -> None:
    """Record when keys were last used: once per ledger batch, never per request."""
    with transaction.atomic():
        for key_id, when in last_used.items():
            ApiKey.objects.filter(pk=key_id).exclude(last_used_at__gte=when).update(
                last_used_at=when
            )


def quick_start_keys_in_use() -> list[str]:
    """Prefixes of the well-known quick-start keys that are still active."""
    hashes = [hash_key(k) for k in QUICK_START_KEYS]
    return list(
        ApiKey.objects.filter(key_hash__in=hashes, revoked_at__isnull=True).values_list(
            "prefix", flat=True
        )
    )


def get_or_create_user(username: str) -> tuple[User, bool]:
    return User.objects.get_or_create(username=username)


# A key's own limits, tighter than its user's; None = only the user's limits apply.
KEY_LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_hour",
    "tokens_per_day",
    "max_parallel_requests",
)


def update_api_key(
    key: ApiKey,
    *,
    actor: User | None,
    actor_label: str | None = None,
    name: str,
    expires_at: datetime | None,
    **limits: int | None,
) -> bool:
    """Change what an operator may change on a key (name, expiry, its own limits); returns
    whether anything changed (and only then writes an audit row).

    Only these columns are written: a full save() from a form opened earlier would put back an
    old revoked_at (un-revoking a key revoked meanwhile) or an old last_used_at.
    """
    unknown = set(limits) - set(KEY_LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown key limit fields: {sorted(unknown)}")
    wanted: dict[str, object] = {"name": name, "expires_at": expires_at, **limits}
    details = changes({field: getattr(key, field) for field in wanted}, wanted)
    if not details:
        return False
    for field in details:
        setattr(key, field, wanted[field])
    with transaction.atomic():
        key.save(update_fields=list(details))
        record_audit(actor, AuditAction.KEY_CHANGED, key, details, actor_label)
    return True


# --- The audit log ------------------------------------------------------------------------------

# Who a change is recorded as when no user made it and the caller names no command.
SYSTEM_LABEL = "system"


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The fields whose value differs, as {field: {"old": …, "new": …}} (an audit's details)."""
    return {
        field: {"old": _shown(old.get(field)), "new": _shown(value)}
        for field, value in new.items()
        if old.get(field) != value
    }


def _shown(value: Any) -> Any:
    # Times as the admin shows them (Asia/Seoul, to the second), not as UTC with microseconds.
    if isinstance(value, datetime):
        return timezone.localtime(value).isoformat(timespec="seconds")
    return value


def record_edit(
    actor: User | None,
    action: AuditAction,
    target: models.Model,
    before: models.Model | None,
    after: models.Model,
    fields: list[str],
) -> AuditEvent | None:
    """The audit row for an edit made through a form (the admin's pages): each of `fields` as
    it was in `before` (None: created) and is in `after`; nothing if nothing changed. Call it in
    the transaction that saved `after`."""
    old = {name: _plain(getattr(before, name)) for name in fields} if before else {}
    new = {name: _plain(getattr(after, name)) for name in fields}
    details: dict[str, Any] = {"created": True, **new} if before is None else {**changes(old, new)}
    if not details:
        return None
    return record_audit(actor, action, target, details)


def _plain(value: Any) -> Any:
    # A related object by its name (what the admin shows), times as _shown.
    return str(value) if isinstance(value, models.Model) else _shown(value)


def record_audit(
    actor: User | None,
    action: AuditAction,
    target: models.Model,
    details: dict[str, Any],
    label: str | None = None,
) -> AuditEvent:
    """Write one audit row; call it inside the transaction that makes the change, so that the
    change and its record are committed (or rolled back) together."""
    event = audit_event(actor, action, target, details, label)
    event.save()
    return event


def audit_event(
    actor: User | None,
    action: AuditAction,
    target: models.Model,
    details: dict[str, Any],
    label: str | None = None,
) -> AuditEvent:
    """An unsaved audit row (for bulk_create); `label` names a command when actor is None."""
    return AuditEvent(
        actor=actor,
        actor_label=_clamp(
            label or (actor.get_username() if actor else SYSTEM_LABEL), "actor_label"
        ),
        action=action,
        target_type=target._meta.label_lower,
        target_id=target.pk,
        target_label=_clamp(_describe(target), "target_label"),
        details=details,
    )


def audit_target(model: type[models.Model], pk: int) -> dict[str, Any]:
    """The filter for one object's audit events (served by the target index)."""
    return {"target_type": model._meta.label_lower, "target_id": pk}


def _describe(target: models.Model) -> str:
    # A key's own __str__ reads its user: the prefix alone is enough and costs no query.
    if isinstance(target, ApiKey):
        return f"{target.prefix}…"
    return str(target)


def _clamp(text: str, field_name: str) -> str:
    field = AuditEvent._meta.get_field(field_name)
    assert isinstance(field, models.CharField) and field.max_length is not None
    return text[: field.max_length]
