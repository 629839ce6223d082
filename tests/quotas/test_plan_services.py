"""Plans made, changed and deleted through the services (validated by the model, audited with
the actor, no row without a change), and the self-service policy for a user's own API keys,
concurrency included."""

from __future__ import annotations

import contextlib
import json
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import connection
from django.utils import timezone

from accounts.models import ApiKey, AuditAction, AuditEvent
from accounts.services import audit_target, create_api_key, revoke_api_keys
from quotas import services
from quotas.models import Plan
from quotas.services import (
    DEFAULT_PLAN_NAME,
    KeyPolicyError,
    PlanInUse,
    create_own_api_key,
    create_plan,
    default_plan,
    delete_plan,
    effective_limits_for,
    revoke_own_api_key,
    set_plan_limits,
    set_user_quota,
    update_plan,
    user_plan,
)

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


@pytest.fixture
def operator() -> User:
    return User.objects.create_user("운영자", is_staff=True)


@pytest.fixture
def member() -> User:
    return User.objects.create_user("홍길동")


def events_of(target: Any) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(**audit_target(type(target), target.pk)))


def all_details() -> str:
    return json.dumps(list(AuditEvent.objects.values_list("details", flat=True)))


def _broken(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("audit write failed")


# --- Creating -----------------------------------------------------------------------------------


def test_a_new_plan_is_audited_with_every_value(operator: User) -> None:
    plan = create_plan(
        actor=operator, name="프로", tokens_per_day=2_000_000, allowed_models=["korean-qwen"]
    )

    plan.refresh_from_db()
    assert (plan.tokens_per_day, plan.self_service_keys, plan.max_keys_per_user) == (
        2_000_000,
        True,
        5,
    )
    [event] = events_of(plan)
    assert (event.action, event.actor, event.target_label) == (
        AuditAction.PLAN_CREATED,
        operator,
        "프로",
    )
    assert event.details["tokens_per_day"] == 2_000_000
    assert event.details["allowed_models"] == ["korean-qwen"]
    assert event.details["self_service_keys"] is True and event.details["max_keys_per_user"] == 5


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "p", "tokens_per_minute": -1}, "tokens_per_minute"),
        ({"name": "p", "max_keys_per_user": -1}, "max_keys_per_user"),
        ({"name": "p", "extra_request_fields": ["rid"]}, "extra_request_fields"),
        ({"name": "p", "allowed_models": "korean-qwen"}, "allowed_models"),
        ({"name": "p", "allowed_models": [""]}, "allowed_models"),
        ({"name": "p", "priority": 2**40}, "priority"),
    ],
)
def test_a_bad_plan_is_refused_by_field(operator: User, fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        create_plan(actor=operator, **fields)

    assert field in caught.value.message_dict
    assert not Plan.objects.exists() and not AuditEvent.objects.exists()


def test_a_taken_name_and_an_unknown_field_are_refused(operator: User) -> None:
    create_plan(actor=operator, name="프로")

    with pytest.raises(ValidationError) as caught:
        create_plan(actor=operator, name="프로")
    assert list(caught.value.message_dict) == ["name"]
    with pytest.raises(ValueError, match="unknown plan fields"):
        create_plan(actor=operator, name="다른", id=99)
    assert Plan.objects.count() == 1


# --- Changing -----------------------------------------------------------------------------------


def test_a_change_records_old_and_new_once(operator: User) -> None:
    plan = create_plan(actor=None, name="프로")
    AuditEvent.objects.all().delete()

    assert update_plan(
        plan, actor=operator, description="설명", self_service_keys=False, max_keys_per_user=2
    )
    # Values as a form or JSON would send them clean to the same: no change, no row.
    assert not update_plan(plan, actor=operator, max_keys_per_user="2", description="설명")

    [event] = events_of(plan)
    assert (event.action, event.actor) == (AuditAction.PLAN_CHANGED, operator)
    assert event.details == {
        "description": {"old": "", "new": "설명"},
        "self_service_keys": {"old": True, "new": False},
        "max_keys_per_user": {"old": 5, "new": 2},
    }
    stored = Plan.objects.get(pk=plan.pk)
    assert (stored.self_service_keys, stored.max_keys_per_user) == (False, 2)
    assert (plan.self_service_keys, plan.max_keys_per_user) == (False, 2)


def test_the_old_values_are_the_stored_ones(operator: User) -> None:
    plan = create_plan(actor=None, name="프로", tokens_per_minute=100)
    stale = Plan.objects.get(pk=plan.pk)
    update_plan(plan, actor=operator, tokens_per_minute=200)

    assert update_plan(stale, actor=operator, tokens_per_minute=300)

    assert events_of(plan)[0].details == {"tokens_per_minute": {"old": 200, "new": 300}}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tokens_per_hour": -5}, "tokens_per_hour"),
        ({"extra_request_fields": ["priority"]}, "extra_request_fields"),
        ({"allowed_models": {"a": 1}}, "allowed_models"),
        ({"name": "기본형"}, "name"),  # another plan's
    ],
)
def test_a_bad_change_writes_nothing(operator: User, fields: dict[str, Any], field: str) -> None:
    create_plan(actor=None, name="기본형")
    plan = create_plan(actor=None, name="프로", tokens_per_hour=1000)
    AuditEvent.objects.all().delete()

    with pytest.raises(ValidationError) as caught:
        update_plan(plan, actor=operator, description="바뀜", **fields)

    assert list(caught.value.message_dict) == [field]
    stored = Plan.objects.get(pk=plan.pk)
    assert (stored.name, stored.description, stored.tokens_per_hour) == ("프로", "", 1000)
    assert (plan.name, plan.description) == ("프로", "")
    assert not AuditEvent.objects.exists()


def test_set_plan_limits_takes_limits_only(operator: User) -> None:
    plan = default_plan()
    with pytest.raises(ValueError, match="unknown plan limits"):
        set_plan_limits(plan, actor=operator, description="x")

    assert set_plan_limits(plan, actor=operator, tokens_per_minute=1234)
    assert events_of(plan)[0].details == {"tokens_per_minute": {"old": 8000, "new": 1234}}


def test_changing_rolls_back_when_the_audit_write_fails(
    operator: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = create_plan(actor=None, name="프로")
    monkeypatch.setattr("quotas.services.record_audit", _broken)

    with pytest.raises(RuntimeError):
        update_plan(plan, actor=operator, tokens_per_day=1)
    with pytest.raises(RuntimeError):
        create_plan(actor=operator, name="새 플랜")
    with pytest.raises(RuntimeError):
        delete_plan(plan, actor=operator)

    assert list(Plan.objects.values_list("name", "tokens_per_day")) == [("프로", 1_000_000)]


# --- Deleting -----------------------------------------------------------------------------------


def test_a_plan_with_users_is_not_deleted(operator: User, member: User) -> None:
    plan = create_plan(actor=None, name="프로")
    set_user_quota(member, plan, actor=None)
    set_user_quota(User.objects.create_user("둘째"), plan, actor=None)
    AuditEvent.objects.all().delete()

    with pytest.raises(PlanInUse) as caught:
        delete_plan(plan, actor=operator)

    assert caught.value.users == 2 and "2" in str(caught.value)
    assert Plan.objects.filter(pk=plan.pk).exists() and not AuditEvent.objects.exists()


def test_the_default_plan_is_not_deleted(operator: User, member: User) -> None:
    with pytest.raises(PlanInUse) as caught:
        delete_plan(default_plan(), actor=operator)

    assert caught.value.users == User.objects.count()
    assert Plan.objects.filter(name=DEFAULT_PLAN_NAME).exists()


def test_an_unused_plan_is_deleted_and_audited(operator: User) -> None:
    plan = create_plan(actor=None, name="프로", tokens_per_day=42)
    plan_id = plan.pk

    delete_plan(plan, actor=operator, actor_label="정리")

    assert not Plan.objects.filter(pk=plan_id).exists()
    [event] = AuditEvent.objects.filter(action=AuditAction.PLAN_DELETED)
    assert (event.actor, event.actor_label, event.target_id) == (operator, "정리", plan_id)
    assert event.target_label == "프로" and event.details["tokens_per_day"] == 42


# --- What a user is on --------------------------------------------------------------------------


def test_a_user_without_a_quota_is_on_the_default_plan(member: User) -> None:
    set_plan_limits(default_plan(), actor=None, tokens_per_day=777)

    assert user_plan(member).name == DEFAULT_PLAN_NAME
    assert effective_limits_for(member).tokens_per_day == 777


def test_a_user_s_quota_gives_their_plan_and_overrides(member: User) -> None:
    plan = create_plan(actor=None, name="프로", tokens_per_day=5000, tokens_per_hour=900)
    set_user_quota(member, plan, actor=None, tokens_per_hour=100, allowed_models=["a"])

    assert user_plan(member) == plan
    limits = effective_limits_for(member)
    assert (limits.tokens_per_day, limits.tokens_per_hour, limits.allowed_models) == (
        5000,
        100,
        ("a",),
    )


# --- A user's own keys --------------------------------------------------------------------------


def on_plan(user: User, **fields: Any) -> Plan:
    plan = create_plan(actor=None, name=f"plan-{user.pk}", **fields)
    set_user_quota(user, plan, actor=None)
    return plan


def test_a_user_creates_their_own_key_as_the_actor(member: User) -> None:
    key, raw = create_own_api_key(member, name="노트북")

    assert key.user == member and key.name == "노트북" and raw.startswith("sk-")
    [event] = events_of(key)
    assert (event.action, event.actor, event.actor_label) == (
        AuditAction.KEY_CREATED,
        member,
        "홍길동",
    )
    assert raw not in all_details() and key.key_hash not in all_details()


def test_the_plan_can_switch_self_service_off(member: User) -> None:
    plan = on_plan(member, self_service_keys=False)
    key, _raw = create_api_key(member, actor=None)  # an operator's key

    with pytest.raises(KeyPolicyError) as created:
        create_own_api_key(member, name="x")
    with pytest.raises(KeyPolicyError) as revoked:
        revoke_own_api_key(member, key.pk)

    assert created.value.code == revoked.value.code == KeyPolicyError.SELF_SERVICE_OFF
    assert ApiKey.objects.filter(user=member, revoked_at__isnull=True).count() == 1
    update_plan(plan, actor=None, self_service_keys=True)
    assert revoke_own_api_key(member, key.pk)


def test_the_default_plan_s_policy_applies_without_a_quota(member: User) -> None:
    update_plan(default_plan(), actor=None, self_service_keys=False)

    with pytest.raises(KeyPolicyError):
        create_own_api_key(member, name="x")


def test_at_most_max_keys_per_user_active_keys(member: User) -> None:
    on_plan(member, max_keys_per_user=2)
    first, _ = create_own_api_key(member, name="1")
    create_own_api_key(member, name="2")

    with pytest.raises(KeyPolicyError) as caught:
        create_own_api_key(member, name="3")
    assert caught.value.code == KeyPolicyError.TOO_MANY_KEYS and "2" in str(caught.value)

    # Neither a revoked nor an expired key counts.
    revoke_api_keys([first], actor=None)
    expiring, _ = create_own_api_key(member, name="3")
    ApiKey.objects.filter(pk=expiring.pk).update(expires_at=timezone.now())
    create_own_api_key(member, name="4")
    assert ApiKey.objects.filter(user=member).count() == 4


def test_zero_means_no_limit(member: User) -> None:
    on_plan(member, max_keys_per_user=0)
    for n in range(7):
        create_own_api_key(member, name=str(n))
    assert ApiKey.objects.filter(user=member).count() == 7


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "x" * 101}, "name"),
        ({"name": "x", "expires_at": timezone.now() - timedelta(minutes=1)}, "expires_at"),
    ],
)
def test_bad_key_input_is_refused_by_field(
    member: User, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        create_own_api_key(member, **kwargs)

    assert list(caught.value.message_dict) == [field]
    assert not ApiKey.objects.exists()


def test_an_inactive_user_creates_no_key(member: User) -> None:
    User.objects.filter(pk=member.pk).update(is_active=False)

    with pytest.raises(KeyPolicyError) as caught:
        create_own_api_key(member, name="x")

    assert caught.value.code == KeyPolicyError.INACTIVE_USER and not ApiKey.objects.exists()


def test_a_user_revokes_only_their_own_keys(member: User, operator: User) -> None:
    mine, _ = create_own_api_key(member, name="내 키")
    theirs, _ = create_api_key(operator, actor=None)

    assert not revoke_own_api_key(member, theirs.pk)
    assert not revoke_own_api_key(member, 10**12)
    assert not revoke_own_api_key(member, True)
    assert not revoke_own_api_key(member, str(mine.pk))
    assert revoke_own_api_key(member, mine.pk)
    assert revoke_own_api_key(member, mine.pk)  # still theirs, already revoked

    assert ApiKey.objects.get(pk=theirs.pk).revoked_at is None
    assert ApiKey.objects.get(pk=mine.pk).revoked_at is not None
    revoked = AuditEvent.objects.filter(action=AuditAction.KEY_REVOKED)
    assert [(e.target_id, e.actor) for e in revoked] == [(mine.pk, member)]


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_never_exceed_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both threads count before either inserts, unless the user's row lock makes the second
    wait: each waits (bounded) for the other after counting, so without the lock both would
    count 0 and both create a key."""
    member = User.objects.create_user("동시사용자")
    on_plan(member, max_keys_per_user=1)
    counted = threading.Barrier(2)
    real_active_keys = services._active_keys

    class CountThenWait:
        def __init__(self, user: User) -> None:
            self.queryset = real_active_keys(user)

        def count(self) -> int:
            found = self.queryset.count()
            # Broken when the other thread is waiting for this one's lock: expected.
            with contextlib.suppress(threading.BrokenBarrierError):
                counted.wait(timeout=2)
            return found

    monkeypatch.setattr(services, "_active_keys", CountThenWait)
    outcomes: list[str] = []

    def create() -> None:
        try:
            create_own_api_key(member, name="동시")
            outcomes.append("created")
        except KeyPolicyError as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not any(thread.is_alive() for thread in threads)
    assert sorted(outcomes) == sorted(["created", KeyPolicyError.TOO_MANY_KEYS])
    assert ApiKey.objects.filter(user=member).count() == 1


# --- In the admin -------------------------------------------------------------------------------


def test_the_admin_audits_a_new_plan_and_a_deletion(admin_client: Any, admin_user: User) -> None:
    added = admin_client.post(
        "/admin/quotas/plan/add/",
        {
            "name": "관리자 플랜",
            "description": "",
            "requests_per_minute": 1,
            "tokens_per_minute": 1,
            "tokens_per_hour": 1,
            "tokens_per_day": 1,
            "cooldown_minutes": 1,
            "max_parallel_requests": 1,
            "allowed_models": "",  # one name per line (accounts/admin_forms.py)
            "extra_request_fields": "",
            "self_service_keys": "on",
            "max_keys_per_user": 3,
            "fair_share_weight": 2,
            "max_queue_seconds": 10,
        },
    )
    assert added.status_code == 302, added.content.decode()[:2000]
    plan = Plan.objects.get(name="관리자 플랜")
    assert plan.max_keys_per_user == 3
    [created] = events_of(plan)
    assert (created.action, created.actor) == (AuditAction.PLAN_CREATED, admin_user)

    deleted = admin_client.post(f"/admin/quotas/plan/{plan.pk}/delete/", {"post": "yes"})

    assert deleted.status_code == 302 and not Plan.objects.filter(pk=plan.pk).exists()
    [gone] = AuditEvent.objects.filter(action=AuditAction.PLAN_DELETED)
    assert (gone.actor, gone.target_id) == (admin_user, plan.pk)


def test_the_admin_cannot_delete_the_default_plan(admin_client: Any) -> None:
    plan = default_plan()

    response = admin_client.post(f"/admin/quotas/plan/{plan.pk}/delete/", {"post": "yes"})

    assert response.status_code == 403 and Plan.objects.filter(pk=plan.pk).exists()
