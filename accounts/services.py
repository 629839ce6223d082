"""Every change to users, API keys and operator tokens goes through these functions."""

from __future__ import annotations

import copy
import hashlib
import math
import secrets
import string
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.validators import MaxLengthValidator
from django.db import IntegrityError, models, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext

from accounts.models import ApiKey, AuditAction, AuditEvent, OperatorScope, OperatorToken

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


# --- Checks shared by every credential's creation ------------------------------------------------

CREDENTIAL_NAME_MAX = 100  # ApiKey.name and OperatorToken.name


def check_credential_name(name: object) -> str:
    """A key's or token's name as given from outside: text of at most CREDENTIAL_NAME_MAX
    characters (ValidationError on "name" otherwise)."""
    if not isinstance(name, str):
        raise ValidationError({"name": gettext("Enter a text.")})
    try:
        MaxLengthValidator(CREDENTIAL_NAME_MAX)(name)
    except ValidationError as exc:
        raise ValidationError({"name": exc.error_list}) from None
    return name


def check_expiry(expires_at: datetime | None) -> datetime | None:
    """An expiry given from outside: None, or a time in the future (ValidationError on
    "expires_at" otherwise). A naive time is read in the current time zone, as forms do."""
    if expires_at is None:
        return None
    if not isinstance(expires_at, datetime):
        raise ValidationError({"expires_at": gettext("Enter a valid date/time.")})
    if timezone.is_naive(expires_at):
        expires_at = timezone.make_aware(expires_at)
    if expires_at <= timezone.now():
        raise ValidationError({"expires_at": gettext("The expiry must be in the future.")})
    return expires_at


# --- Operator tokens ----------------------------------------------------------------------------

# Not "sk-": an operator token can never be mistaken for (or used as) a client key.
OPERATOR_TOKEN_PREFIX = "op-"
# Longer than any token issued here: refused before it is hashed or looked up.
MAX_OPERATOR_TOKEN_CHARS = 200
# last_used_at is written at most this often per token: a write per API call would make every
# read a write.
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)


def generate_operator_token() -> str:
    return OPERATOR_TOKEN_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def create_operator_token(
    user: User,
    *,
    actor: User | None,
    actor_label: str | None = None,
    name: str,
    scope: str,
    expires_at: datetime | None = None,
) -> tuple[OperatorToken, str]:
    """A new token acting as `user` (active staff only: ValueError otherwise); the raw token is
    returned here and never again (nor stored, nor audited)."""
    if not user.is_staff or not user.is_active:
        raise ValueError(gettext("Operator tokens can only be given to active staff users."))
    if scope not in OperatorScope.values:
        raise ValidationError({"scope": gettext('Choose "read" or "write".')})
    name = check_credential_name(name)
    expires_at = check_expiry(expires_at)
    raw_token = generate_operator_token()
    with transaction.atomic():
        token = OperatorToken.objects.create(
            user=user,
            name=name,
            prefix=visible_prefix(raw_token),
            key_hash=hash_key(raw_token),
            scope=scope,
            expires_at=expires_at,
        )
        details = {
            "user": user.get_username(),
            "name": token.name,
            "prefix": token.prefix,
            "scope": token.scope,
            "expires_at": _shown(token.expires_at),
        }
        record_audit(actor, AuditAction.OPERATOR_TOKEN_CREATED, token, details, actor_label)
    return token, raw_token


def revoke_operator_token(
    token: OperatorToken, *, actor: User | None, actor_label: str | None = None
) -> bool:
    """Revoke a token; returns whether it was revoked now (False: it already was). Takes effect
    on the token's next request: find_operator_token reads the row every time."""
    now = timezone.now()
    with transaction.atomic():
        # Conditional: of two concurrent revokes, the second waits for the first's row lock,
        # then matches nothing, so the token is audited once.
        revoked = OperatorToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=now
        )
        if not revoked:
            return False
        details = changes({"revoked_at": None}, {"revoked_at": now})
        record_audit(actor, AuditAction.OPERATOR_TOKEN_REVOKED, token, details, actor_label)
    token.revoked_at = now
    return True


def find_operator_token(raw: str) -> OperatorToken | None:
    """The usable token `raw` names, with its user, in one query; None if it is unknown,
    revoked, expired, or its user is inactive or no longer staff."""
    if (
        not isinstance(raw, str)
        or not raw.startswith(OPERATOR_TOKEN_PREFIX)
        or len(raw) > MAX_OPERATOR_TOKEN_CHARS
    ):
        return None
    return (
        OperatorToken.objects.select_related("user")
        .filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()),
            key_hash=hash_key(raw),
            revoked_at__isnull=True,
            user__is_active=True,
            user__is_staff=True,
        )
        .order_by()
        .first()
    )


def touch_operator_token(token: OperatorToken) -> None:
    """Record that the token was used: no query if this instance was touched within
    TOKEN_TOUCH_INTERVAL, else one conditional UPDATE (other processes touching the same token
    meanwhile make it match nothing). Usage, not a change: not audited."""
    now = timezone.now()
    if token.last_used_at is not None and now - token.last_used_at < TOKEN_TOUCH_INTERVAL:
        return
    OperatorToken.objects.filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - TOKEN_TOUCH_INTERVAL),
        pk=token.pk,
    ).update(last_used_at=now)
    token.last_used_at = now


# --- Users --------------------------------------------------------------------------------------

# What update_user may change besides the password. Not is_superuser: that stays with
# `createsuperuser` and the admin's user page, never with an API.
USER_FIELDS = ("email", "first_name", "last_name", "is_active", "is_staff")
# Hashing cost grows with the length; no person types more.
MAX_PASSWORD_CHARS = 1024


def create_user(
    *,
    actor: User | None,
    actor_label: str | None = None,
    username: str,
    email: str = "",
    password: str | None = None,
    is_staff: bool = False,
    is_active: bool = True,
    first_name: str = "",
    last_name: str = "",
) -> User:
    """A new user, validated as the admin's form would (ValidationError by field); without a
    password the user cannot log in with one (API keys only)."""
    if not isinstance(username, str):
        raise ValidationError({"username": gettext("Enter a text.")})
    user = User(
        username=username,
        email=email,
        first_name=first_name,
        last_name=last_name,
        is_staff=is_staff,
        is_active=is_active,
    )
    user.set_unusable_password()
    # Username validators and length, uniqueness, the e-mail; clean() normalises both.
    user.full_clean()
    if password is not None:
        user.password = _hashed_password(password, user)
    details = {
        **{field: getattr(user, field) for field in ("username", *USER_FIELDS)},
        "password": "set" if password is not None else "unusable",
    }
    with transaction.atomic():
        try:
            with transaction.atomic():
                user.save()
        except IntegrityError:
            # Created by someone else since full_clean checked.
            unique = user.unique_error_message(User, ("username",))
            raise ValidationError({"username": unique}) from None
        record_audit(actor, AuditAction.USER_CREATED, user, details, actor_label)
    return user


def update_user(
    user: User, *, actor: User | None, actor_label: str | None = None, **fields: Any
) -> bool:
    """Change USER_FIELDS and/or the password; returns whether anything changed (and only then
    writes an audit row). A new password is audited as "changed", never as its hash."""
    unknown = set(fields) - set(USER_FIELDS) - {"password"}
    if unknown:
        raise ValueError(f"unknown user fields: {sorted(unknown)}")
    password = fields.pop("password", None)
    # Hashed before the row is locked: hashing takes a good part of a second.
    hashed = _hashed_password(password, user) if password is not None else None
    with transaction.atomic():
        current = User.objects.select_for_update().get(pk=user.pk)
        edited, changed = validated_changes(current, fields)
        details: dict[str, Any] = dict(changed)
        if actor is not None and actor.pk == user.pk:
            # An operator locking themselves out is a mistake; another operator can do it.
            if current.is_staff and not edited.is_staff:
                raise ValueError(gettext("You cannot remove your own staff status."))
            if current.is_active and not edited.is_active:
                raise ValueError(gettext("You cannot deactivate yourself."))
        written = list(details)
        if hashed is not None:
            details["password"] = "changed"
            written.append("password")
            edited.password = hashed
        if not details:
            return False
        edited.save(update_fields=written)
        record_audit(actor, AuditAction.USER_CHANGED, edited, details, actor_label)
    for field in written:
        setattr(user, field, getattr(edited, field))
    return True


def _hashed_password(password: object, user: User) -> str:
    """The hash of a new password that passes AUTH_PASSWORD_VALIDATORS (ValidationError on
    "password" otherwise)."""
    if not isinstance(password, str) or not password:
        raise ValidationError({"password": gettext("Enter a password.")})
    try:
        MaxLengthValidator(MAX_PASSWORD_CHARS)(password)
        validate_password(password, user)
    except ValidationError as exc:
        raise ValidationError({"password": exc.error_list}) from None
    return make_password(password)


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


def validated_changes(
    current: models.Model, wanted: Mapping[str, Any]
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """A copy of `current` with `wanted` applied and validated as the model's full_clean does
    for those fields (ValidationError by field: type, length, choices, validators, uniqueness),
    and the audit details of what differs from `current` once cleaned ("5" for an integer
    field is 5, and no change if it was 5)."""
    edited = copy.copy(current)
    for field, value in wanted.items():
        setattr(edited, field, value)
    others = [field.name for field in type(current)._meta.fields if field.name not in wanted]
    edited.full_clean(exclude=others)
    cleaned = {field: getattr(edited, field) for field in wanted}
    return edited, changes({field: getattr(current, field) for field in wanted}, cleaned)


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
