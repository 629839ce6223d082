"""Operator tokens: made for active staff only, the raw token shown once and never stored or
audited, found in one query only while usable, revoked once, touched at most once a minute."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse
from django.utils import timezone, translation

from accounts.models import AuditAction, AuditEvent, OperatorScope, OperatorToken
from accounts.services import (
    OPERATOR_TOKEN_PREFIX,
    TOKEN_TOUCH_INTERVAL,
    audit_target,
    create_api_key,
    create_operator_token,
    find_operator_token,
    revoke_operator_token,
    touch_operator_token,
)

RAW_TOKEN = re.compile(r"op-[A-Za-z0-9_-]{40,}")

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


@pytest.fixture
def staff() -> User:
    return User.objects.create_user("운영자", is_staff=True)


@pytest.fixture
def boss() -> User:
    return User.objects.create_user("관리책임자", is_staff=True)


def events_of(target: Any) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(**audit_target(type(target), target.pk)))


def all_details() -> str:
    return json.dumps(list(AuditEvent.objects.values_list("details", flat=True)))


def make(user: User, **kwargs: Any) -> tuple[OperatorToken, str]:
    kwargs = {"actor": None, "name": "배포 스크립트", "scope": "read", **kwargs}
    return create_operator_token(user, **kwargs)


# --- Creating -----------------------------------------------------------------------------------


def test_a_token_is_op_prefixed_hashed_and_audited_without_its_secret(
    staff: User, boss: User
) -> None:
    token, raw = make(staff, actor=boss, scope="write")

    assert raw.startswith(OPERATOR_TOKEN_PREFIX) and len(raw) >= 40
    assert RAW_TOKEN.fullmatch(raw)
    token.refresh_from_db()
    assert token.key_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert token.prefix == raw[:11] and raw not in {token.prefix, token.name, token.key_hash}
    assert (token.user, token.scope, token.revoked_at) == (staff, "write", None)
    [event] = events_of(token)
    assert event.action == AuditAction.OPERATOR_TOKEN_CREATED
    assert (event.actor, event.actor_label, event.target_label) == (
        boss,
        "관리책임자",
        f"{token.prefix}…",
    )
    assert event.details == {
        "user": "운영자",
        "name": "배포 스크립트",
        "prefix": token.prefix,
        "scope": "write",
        "expires_at": None,
    }
    assert raw not in all_details() and token.key_hash not in all_details()


def test_two_tokens_differ(staff: User) -> None:
    (_first, one), (_second, two) = make(staff), make(staff)
    assert one != two


@pytest.mark.parametrize(
    "attributes", [{"is_staff": False}, {"is_active": False}], ids=["not staff", "inactive"]
)
def test_only_active_staff_get_tokens(attributes: dict[str, bool], boss: User) -> None:
    user = User.objects.create_user("일반사용자", **attributes)

    with translation.override("en"), pytest.raises(ValueError, match="active staff"):
        make(user, actor=boss)

    assert not OperatorToken.objects.exists() and not AuditEvent.objects.exists()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scope": "admin"}, "scope"),
        ({"name": "x" * 101}, "name"),
        ({"expires_at": timezone.now() - timedelta(seconds=1)}, "expires_at"),
    ],
)
def test_bad_input_is_refused_by_field(staff: User, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make(staff, **kwargs)

    assert list(caught.value.message_dict) == [field]
    assert not OperatorToken.objects.exists() and not AuditEvent.objects.exists()


def test_creating_rolls_back_when_the_audit_write_fails(
    staff: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("accounts.services.record_audit", _broken)

    with pytest.raises(RuntimeError):
        make(staff)

    assert not OperatorToken.objects.exists()


def _broken(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("audit write failed")


# --- Scopes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scope", "read", "write"), [("read", True, False), ("write", True, True)])
def test_write_implies_read(staff: User, scope: str, read: bool, write: bool) -> None:
    token, _raw = make(staff, scope=scope)

    assert (token.allows(OperatorScope.READ), token.allows(OperatorScope.WRITE)) == (read, write)
    assert not token.allows("admin")


# --- Finding ------------------------------------------------------------------------------------


def test_a_usable_token_is_found_with_its_user_in_one_query(
    staff: User, django_assert_num_queries: Any
) -> None:
    token, raw = make(staff)

    with django_assert_num_queries(1):
        found = find_operator_token(raw)
        assert found is not None and found.user.get_username() == "운영자"

    assert found.pk == token.pk


def _revoke(token: OperatorToken) -> None:
    revoke_operator_token(token, actor=None)


def _expire(token: OperatorToken) -> None:
    OperatorToken.objects.filter(pk=token.pk).update(expires_at=timezone.now())


def _demote(token: OperatorToken) -> None:
    User.objects.filter(pk=token.user_id).update(is_staff=False)


def _deactivate(token: OperatorToken) -> None:
    User.objects.filter(pk=token.user_id).update(is_active=False)


@pytest.mark.parametrize(
    "spoil", [_revoke, _expire, _demote, _deactivate], ids=lambda f: f.__name__.strip("_")
)
def test_an_unusable_token_is_not_found(
    staff: User, spoil: Any, django_assert_num_queries: Any
) -> None:
    token, raw = make(staff)
    assert find_operator_token(raw) is not None
    spoil(token)

    with django_assert_num_queries(1):
        assert find_operator_token(raw) is None


def test_a_token_expiring_later_is_found(staff: User) -> None:
    _token, raw = make(staff, expires_at=timezone.now() + timedelta(hours=1))
    assert find_operator_token(raw) is not None


def test_unknown_tokens_are_not_found(staff: User, django_assert_num_queries: Any) -> None:
    _token, raw = make(staff)

    with django_assert_num_queries(1):
        assert find_operator_token(raw[:-1] + ("A" if raw[-1] != "A" else "B")) is None
    # Not an operator token at all: refused without a query.
    _key, client_key = create_api_key(staff, actor=None)
    with django_assert_num_queries(0):
        assert find_operator_token(client_key) is None
        assert find_operator_token(raw + "x" * 300) is None
        assert find_operator_token("") is None
        assert find_operator_token(None) is None


# --- Revoking -----------------------------------------------------------------------------------


def test_revoking_is_audited_once(staff: User, boss: User) -> None:
    token, _raw = make(staff)

    assert revoke_operator_token(token, actor=boss, actor_label="정리 스크립트")
    assert not revoke_operator_token(token, actor=boss)

    token.refresh_from_db()
    assert token.revoked_at is not None
    revoked = [e for e in events_of(token) if e.action == AuditAction.OPERATOR_TOKEN_REVOKED]
    assert [(e.actor, e.actor_label) for e in revoked] == [(boss, "정리 스크립트")]
    assert revoked[0].details["revoked_at"]["old"] is None


def test_revoking_rolls_back_when_the_audit_write_fails(
    staff: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, raw = make(staff)
    monkeypatch.setattr("accounts.services.record_audit", _broken)

    with pytest.raises(RuntimeError):
        revoke_operator_token(token, actor=None)

    token.refresh_from_db()
    assert token.revoked_at is None and find_operator_token(raw) is not None


# --- Last use -----------------------------------------------------------------------------------


def test_last_use_is_written_at_most_once_a_minute(
    staff: User, django_assert_num_queries: Any
) -> None:
    token, raw = make(staff)
    first = find_operator_token(raw)
    second = find_operator_token(raw)  # another request, loaded before the first was touched
    assert first is not None and second is not None

    with django_assert_num_queries(1):
        touch_operator_token(first)
    stored = OperatorToken.objects.get(pk=token.pk).last_used_at
    assert stored is not None

    with django_assert_num_queries(0):
        touch_operator_token(first)  # this instance knows it was just touched
    with django_assert_num_queries(1):
        touch_operator_token(second)  # it does not: one UPDATE, which matches nothing
    assert OperatorToken.objects.get(pk=token.pk).last_used_at == stored

    long_ago = stored - TOKEN_TOUCH_INTERVAL - timedelta(seconds=1)
    OperatorToken.objects.filter(pk=token.pk).update(last_used_at=long_ago)
    later = find_operator_token(raw)
    assert later is not None
    touch_operator_token(later)
    touched = OperatorToken.objects.get(pk=token.pk).last_used_at
    assert touched is not None and touched > stored
    assert not AuditEvent.objects.exclude(action=AuditAction.OPERATOR_TOKEN_CREATED).exists()


# --- In the admin -------------------------------------------------------------------------------


@pytest.fixture
def superuser() -> User:
    return User.objects.create_superuser("최고관리자", "root@example.com", "pw")


@pytest.fixture
def client(superuser: User) -> Client:
    client = Client()
    client.force_login(superuser)
    return client


def url(view: str, *args: Any) -> str:
    return reverse(f"admin:accounts_operatortoken_{view}", args=args)


def test_the_admin_shows_a_new_token_once_and_audits_it(
    client: Client, superuser: User, staff: User
) -> None:
    form = {"user": staff.pk, "name": "모니터링", "scope": "read"}
    assert list(client.get(url("add")).context["adminform"].form.fields) == [
        "user",
        "name",
        "scope",
        "expires_at",
    ]

    response = client.post(url("add"), form, follow=True)

    assert response.status_code == 200
    shown = [str(m) for m in get_messages(response.wsgi_request) if RAW_TOKEN.search(str(m))]
    assert len(shown) == 1
    raw = RAW_TOKEN.findall(shown[0])[0]
    token = OperatorToken.objects.get()
    assert find_operator_token(raw) == token and token.name == "모니터링"
    [event] = events_of(token)
    assert (event.action, event.actor) == (AuditAction.OPERATOR_TOKEN_CREATED, superuser)
    assert raw not in all_details() and raw not in str(list(LogEntry.objects.values()))
    page = client.get(url("change", token.pk)).content.decode()
    assert raw not in page and token.key_hash not in page


def test_the_admin_refuses_a_non_staff_user_and_a_past_expiry(client: Client, staff: User) -> None:
    member = User.objects.create_user("홍길동")
    past = timezone.localtime() - timedelta(days=1)

    not_staff = client.post(url("add"), {"user": member.pk, "name": "x", "scope": "read"})
    expired = client.post(
        url("add"),
        {
            "user": staff.pk,
            "name": "x",
            "scope": "read",
            "expires_at_0": past.strftime("%Y-%m-%d"),
            "expires_at_1": past.strftime("%H:%M:%S"),
        },
    )

    assert not_staff.status_code == expired.status_code == 200  # the form again, with errors
    assert "user" in not_staff.context["adminform"].form.errors
    assert "expires_at" in expired.context["adminform"].form.errors
    assert not OperatorToken.objects.exists()


def test_the_admin_lists_tokens_and_revokes_them_audited(
    client: Client, superuser: User, staff: User
) -> None:
    tokens = [make(staff, name=f"토큰 {n}")[0] for n in range(3)]
    revoke_operator_token(tokens[0], actor=None)

    listing = client.get(url("changelist"))
    assert listing.status_code == 200
    assert listing.context["cl"].result_count == 3
    page = listing.content.decode()
    assert all(f"{t.prefix}…" in page for t in tokens) and "key_hash" not in page

    response = client.post(
        url("changelist"),
        {"action": "revoke_selected", "_selected_action": [t.pk for t in tokens]},
    )

    assert response.status_code == 302
    revoked = AuditEvent.objects.filter(action=AuditAction.OPERATOR_TOKEN_REVOKED, actor=superuser)
    assert sorted(revoked.values_list("target_id", flat=True)) == sorted(t.pk for t in tokens[1:])
    assert not OperatorToken.objects.filter(revoked_at__isnull=True).exists()


def test_the_admin_token_list_costs_the_same_queries_for_more_tokens(
    client: Client, staff: User, boss: User
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    counts = []
    for user in (staff, boss):
        make(user)
        with CaptureQueriesContext(connection) as queries:
            assert client.get(url("changelist")).status_code == 200
        counts.append(len(queries))
    assert counts[0] == counts[1]


def test_the_admin_cannot_delete_or_edit_a_token(client: Client, staff: User) -> None:
    token, _raw = make(staff)

    assert client.post(url("delete", token.pk), {"post": "yes"}).status_code == 403
    client.post(url("change", token.pk), {"name": "바뀐 이름", "scope": "write"})

    token.refresh_from_db()
    assert (token.name, token.scope) == ("배포 스크립트", "read")
