"""Users made and changed through the services: validated as the admin's forms would, audited
with the actor (a password only as "set"/"changed", never its hash), and no operator can lock
themselves out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from accounts.models import AuditAction, AuditEvent
from accounts.services import audit_target, create_user, update_user

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

PASSWORD = "긴-비밀번호-correct-horse-42"
VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]


@pytest.fixture
def operator() -> User:
    return User.objects.create_user("운영자", is_staff=True)


@pytest.fixture(autouse=True)
def password_rules(settings: Any) -> None:
    settings.AUTH_PASSWORD_VALIDATORS = VALIDATORS


def events_of(user: User) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(**audit_target(User, user.pk)))


def all_details() -> str:
    return json.dumps(list(AuditEvent.objects.values_list("details", flat=True)))


def _broken(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("audit write failed")


# --- Creating -----------------------------------------------------------------------------------


def test_a_user_without_a_password_cannot_log_in_with_one(operator: User) -> None:
    user = create_user(actor=operator, username="홍길동", email="Hong@EXAMPLE.com")

    user.refresh_from_db()
    assert not user.has_usable_password()
    assert (user.email, user.is_staff, user.is_active) == ("Hong@example.com", False, True)
    [event] = events_of(user)
    assert (event.action, event.actor, event.target_label) == (
        AuditAction.USER_CREATED,
        operator,
        "홍길동",
    )
    assert event.details == {
        "username": "홍길동",
        "email": "Hong@example.com",
        "first_name": "",
        "last_name": "",
        "is_active": True,
        "is_staff": False,
        "password": "unusable",
    }


def test_a_password_is_set_and_audited_as_set_only(operator: User) -> None:
    user = create_user(actor=operator, username="kim", password=PASSWORD, is_staff=True)

    user.refresh_from_db()
    assert user.check_password(PASSWORD) and user.is_staff
    assert events_of(user)[0].details["password"] == "set"
    assert PASSWORD not in all_details() and user.password not in all_details()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"username": "두 단어"}, "username"),  # a space: not a username character
        ({"username": ""}, "username"),
        ({"username": "x" * 151}, "username"),
        ({"username": "ok", "email": "not-an-address"}, "email"),
        ({"username": "ok", "first_name": "x" * 151}, "first_name"),
        ({"username": "ok", "password": "12345678"}, "password"),  # numeric and common
        ({"username": "ok", "password": "짧다"}, "password"),
        ({"username": "ok", "password": "a" * 2000}, "password"),
    ],
)
def test_bad_input_is_refused_by_field(operator: User, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        create_user(actor=operator, **kwargs)

    assert field in caught.value.message_dict
    assert User.objects.count() == 1 and not AuditEvent.objects.exists()


def test_a_taken_username_is_refused(operator: User) -> None:
    with pytest.raises(ValidationError) as caught:
        create_user(actor=operator, username="운영자")

    assert list(caught.value.message_dict) == ["username"]
    assert not AuditEvent.objects.exists()


def test_creating_rolls_back_when_the_audit_write_fails(
    operator: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("accounts.services.record_audit", _broken)

    with pytest.raises(RuntimeError):
        create_user(actor=operator, username="홍길동")

    assert not User.objects.filter(username="홍길동").exists()


# --- Changing -----------------------------------------------------------------------------------


@pytest.fixture
def member(operator: User) -> User:
    user = create_user(actor=None, username="홍길동", email="hong@example.com")
    AuditEvent.objects.all().delete()
    return user


def test_a_change_records_old_and_new_values_once(operator: User, member: User) -> None:
    assert update_user(
        member, actor=operator, email="gildong@EXAMPLE.com", first_name="길동", is_staff=False
    )
    assert not update_user(member, actor=operator, email="gildong@example.com", first_name="길동")

    [event] = events_of(member)
    assert (event.action, event.actor) == (AuditAction.USER_CHANGED, operator)
    assert event.details == {
        "email": {"old": "hong@example.com", "new": "gildong@example.com"},
        "first_name": {"old": "", "new": "길동"},
    }
    stored = User.objects.get(pk=member.pk)
    assert (stored.email, stored.first_name) == (member.email, member.first_name)
    assert member.email == "gildong@example.com"


def test_a_new_password_is_audited_as_changed(operator: User, member: User) -> None:
    assert update_user(member, actor=operator, password=PASSWORD)

    stored = User.objects.get(pk=member.pk)
    assert stored.check_password(PASSWORD)
    [event] = events_of(member)
    assert event.details == {"password": "changed"}
    assert PASSWORD not in all_details() and stored.password not in all_details()


def test_a_weak_password_changes_nothing(operator: User, member: User) -> None:
    with pytest.raises(ValidationError) as caught:
        update_user(member, actor=operator, password="password", first_name="길동")

    assert list(caught.value.message_dict) == ["password"]
    stored = User.objects.get(pk=member.pk)
    assert not stored.has_usable_password() and stored.first_name == ""
    assert not AuditEvent.objects.exists()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"email": "not-an-address"}, "email"),
        ({"last_name": "x" * 151}, "last_name"),
        ({"is_active": None}, "is_active"),
    ],
)
def test_bad_changes_are_refused_by_field(
    operator: User, member: User, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        update_user(member, actor=operator, **fields)

    assert list(caught.value.message_dict) == [field]
    assert not AuditEvent.objects.exists()


def test_only_known_fields_may_change(operator: User, member: User) -> None:
    for field in ("is_superuser", "username", "date_joined"):
        with pytest.raises(ValueError, match="unknown user fields"):
            update_user(member, actor=operator, **{field: True})
    assert not User.objects.get(pk=member.pk).is_superuser


def test_an_operator_cannot_lock_themselves_out(operator: User) -> None:
    with pytest.raises(ValueError):
        update_user(operator, actor=operator, is_staff=False)
    with pytest.raises(ValueError):
        update_user(operator, actor=operator, is_active=False)

    stored = User.objects.get(pk=operator.pk)
    assert stored.is_staff and stored.is_active and not AuditEvent.objects.exists()
    # Their other fields they may change, and another operator may demote them.
    assert update_user(operator, actor=operator, first_name="운영", is_staff=True)
    other = User.objects.create_user("다른운영자", is_staff=True)
    assert update_user(operator, actor=other, is_staff=False, is_active=False)
    stored.refresh_from_db()
    assert not stored.is_staff and not stored.is_active


def test_changing_rolls_back_when_the_audit_write_fails(
    operator: User, member: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("accounts.services.record_audit", _broken)

    with pytest.raises(RuntimeError):
        update_user(member, actor=operator, is_active=False, password=PASSWORD)

    stored = User.objects.get(pk=member.pk)
    assert stored.is_active and not stored.has_usable_password()
