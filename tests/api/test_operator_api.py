"""The operator endpoints: who may call them, that every write is audited with its actor, and
that lists cost a constant number of queries."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from accounts.models import ApiKey, AuditEvent
from gateway.models import ServedModel
from quotas.models import Plan, UsageRecord, UserQuota
from tests.api.conftest import Person, make_person, operator_token

pytestmark = pytest.mark.django_db

OPERATOR_PATHS = [
    "/api/v1/operator/users",
    "/api/v1/operator/plans",
    "/api/v1/operator/keys",
    "/api/v1/operator/models",
    "/api/v1/operator/usage",
    "/api/v1/operator/usage/top",
    "/api/v1/operator/upstreams",
]


def test_client_keys_never_reach_operator_endpoints(operator: Person, alice: Person) -> None:
    # Not even the client key of a staff user: a leaked key must not run the platform.
    for person in (operator, alice):
        for path in OPERATOR_PATHS:
            response = person.client().get(path)
            assert response.status_code == 403, path
            assert response.json()["error"]["type"] == "permission_error"
            assert response.json()["error"]["code"] == "client_key_not_allowed"
    refused = alice.session().get(OPERATOR_PATHS[0])
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_staff"


def test_staff_sessions_and_tokens_do(operator: Person) -> None:
    for client in (operator.session(), operator_token(operator, "read")):
        for path in OPERATOR_PATHS:
            assert client.get(path).status_code == 200, path


def test_a_read_token_cannot_write(operator: Person) -> None:
    reader = operator_token(operator, "read")
    response = reader.post("/api/v1/operator/plans", {"name": "x"}, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "read_only_token"
    writer = operator_token(operator, "write")
    assert writer.post("/api/v1/operator/plans", {"name": "x"}, format="json").status_code == 201


def test_operator_tokens_are_not_client_credentials(operator: Person) -> None:
    response = operator_token(operator).get("/api/v1/me")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "operator_token_not_allowed"


def test_a_token_of_a_user_no_longer_staff_is_refused(operator: Person) -> None:
    client = operator_token(operator)
    operator.user.is_staff = False
    operator.user.save()
    assert client.get("/api/v1/operator/users").status_code == 401


def _audited(action: str, target_id: int) -> AuditEvent:
    return AuditEvent.objects.get(action=action, target_id=target_id)


def test_users_are_created_changed_and_deactivated_with_audit(operator: Person) -> None:
    client = operator_token(operator)
    created = client.post(
        "/api/v1/operator/users",
        {"username": "김철수", "email": "kim@example.com", "plan": "default"},
        format="json",
    )
    assert created.status_code == 201, created.json()
    user_id = created.json()["id"]
    assert created.json()["plan"] == "default"
    event = _audited("user_created", user_id)
    assert event.actor == operator.user and "token" in event.actor_label
    changed = client.patch(f"/api/v1/operator/users/{user_id}", {"is_active": False}, format="json")
    assert changed.status_code == 200 and changed.json()["is_active"] is False
    assert _audited("user_changed", user_id).details["is_active"] == {"old": True, "new": False}
    duplicate = client.post("/api/v1/operator/users", {"username": "김철수"}, format="json")
    assert duplicate.status_code == 400
    assert client.delete(f"/api/v1/operator/users/{user_id}").status_code == 405


def test_quota_is_set_through_the_service(operator: Person, alice: Person) -> None:
    Plan.objects.create(name="pro", tokens_per_day=5_000_000)
    client = operator.session()
    from django.middleware.csrf import _get_new_csrf_string

    token = _get_new_csrf_string()
    client.cookies["csrftoken"] = token
    response = client.put(
        f"/api/v1/operator/users/{alice.user.pk}/quota",
        {"plan": "pro", "tokens_per_minute": 123},
        format="json",
        HTTP_X_CSRFTOKEN=token,
    )
    assert response.status_code == 200, response.json()
    quota = UserQuota.objects.get(user=alice.user)
    assert quota.plan.name == "pro" and quota.tokens_per_minute == 123
    event = AuditEvent.objects.filter(action="quota_changed", target_id=alice.user.pk).latest(
        "created_at"
    )
    assert event.actor == operator.user
    assert client.get(f"/api/v1/operator/users/{alice.user.pk}/quota").json()["plan"] == "pro"
    assert client.get("/api/v1/operator/users/999999/quota").status_code == 404


def test_plans_crud(operator: Person, alice: Person) -> None:
    client = operator_token(operator)
    created = client.post(
        "/api/v1/operator/plans",
        {"name": "startup", "tokens_per_day": 2_000_000, "max_keys_per_user": 3},
        format="json",
    )
    assert created.status_code == 201, created.json()
    plan_id = created.json()["id"]
    _audited("plan_created", plan_id)
    patched = client.patch(
        f"/api/v1/operator/plans/{plan_id}", {"tokens_per_minute": 9}, format="json"
    )
    assert patched.json()["tokens_per_minute"] == 9
    assert _audited("plan_changed", plan_id).details["tokens_per_minute"]["new"] == 9
    bad = client.patch(f"/api/v1/operator/plans/{plan_id}", {"extra_request_fields": ["rid"]},
                       format="json")  # fmt: skip
    assert bad.status_code == 400
    from quotas.services import set_user_quota

    set_user_quota(alice.user, Plan.objects.get(pk=plan_id), actor=None)
    in_use = client.delete(f"/api/v1/operator/plans/{plan_id}")
    assert in_use.status_code == 409
    assert in_use.json()["error"]["code"] == "plan_in_use"
    empty = client.post("/api/v1/operator/plans", {"name": "empty"}, format="json").json()["id"]
    assert client.delete(f"/api/v1/operator/plans/{empty}").status_code == 204
    assert not Plan.objects.filter(pk=empty).exists()
    _audited("plan_deleted", empty)


def test_keys_on_behalf_of_a_user(operator: Person, alice: Person) -> None:
    client = operator_token(operator)
    created = client.post(
        "/api/v1/operator/keys",
        {"user": alice.user.pk, "name": "배치", "tokens_per_minute": 500},
        format="json",
    )
    assert created.status_code == 201, created.json()
    body = created.json()
    assert body["key"].startswith("sk-") and body["username"] == "앨리스"
    key = ApiKey.objects.get(pk=body["id"])
    assert key.user == alice.user and key.tokens_per_minute == 500
    assert _audited("key_created", key.pk).actor == operator.user
    assert "key" not in client.get(f"/api/v1/operator/keys/{key.pk}").json()
    listed = client.get(f"/api/v1/operator/keys?user={alice.user.pk}").json()["results"]
    assert {k["id"] for k in listed} == {alice.key.pk, key.pk}
    revoked = client.post(f"/api/v1/operator/keys/{key.pk}/revoke")
    assert revoked.json()["state"] == "revoked"
    assert _audited("key_revoked", key.pk).actor == operator.user
    patched = client.patch(f"/api/v1/operator/keys/{alice.key.pk}", {"name": "renamed"},
                           format="json")  # fmt: skip
    assert patched.json()["name"] == "renamed"


def test_served_models_crud(operator: Person) -> None:
    client = operator_token(operator)
    created = client.post(
        "/api/v1/operator/models",
        {"name": "LGAI-EXAONE/EXAONE-3.5-7.8B", "aliases": ["exaone"], "context_length": 32768},
        format="json",
    )
    assert created.status_code == 201, created.json()
    model_id = created.json()["id"]
    _audited("model_created", model_id)
    bad = client.patch(f"/api/v1/operator/models/{model_id}", {"upstream_url": "ftp://x"},
                       format="json")  # fmt: skip
    assert bad.status_code == 400 and "upstream_url" in bad.json()["error"]["fields"]
    patched = client.patch(f"/api/v1/operator/models/{model_id}", {"is_active": False},
                           format="json")  # fmt: skip
    assert patched.json()["is_active"] is False
    assert client.delete(f"/api/v1/operator/models/{model_id}").status_code == 204
    assert not ServedModel.objects.filter(pk=model_id).exists()
    _audited("model_deleted", model_id)


def _row(user: User, tokens: int, status: int = 200) -> None:
    started = timezone.now() - timedelta(minutes=10)
    UsageRecord.objects.create(
        request_id=uuid.uuid4().hex, user=user, model="m" if status != 429 else "",
        endpoint="chat", prompt_tokens=tokens, completion_tokens=0, status_code=status,
        error_type="requests" if status == 429 else "",
        started_at=started, finished_at=started + timedelta(seconds=1),
    )  # fmt: skip


def test_top_users_and_usage_across_users(operator: Person, alice: Person, bob: Person) -> None:
    _row(alice.user, 100)
    _row(bob.user, 900)
    _row(alice.user, 0, status=429)
    _row(alice.user, 0, status=429)
    client = operator.session()
    by_tokens = client.get("/api/v1/operator/usage/top?by=tokens").json()
    assert [row["username"] for row in by_tokens][:2] == ["bob", "앨리스"]
    by_429 = client.get("/api/v1/operator/usage/top?by=rate_limited&limit=1").json()
    assert [row["username"] for row in by_429] == ["앨리스"]
    everyone = client.get("/api/v1/operator/usage?period=day").json()
    assert everyone["totals"]["prompt_tokens"] == 1000
    one = client.get(f"/api/v1/operator/usage?period=day&user={bob.user.pk}").json()
    assert one["totals"]["prompt_tokens"] == 900


def test_upstreams_show_the_latest_sample_of_each(operator: Person) -> None:
    from telemetry.models import SGLangSample

    now = timezone.now()
    for url, running in (("http://a:8000", 1.0), ("http://a:8000", 7.0), ("http://b:8000", 3.0)):
        SGLangSample.objects.create(upstream_url=url, scraped_at=now, running_requests=running)
    body = operator.session().get("/api/v1/operator/upstreams").json()
    assert [(s["upstream_url"], s["running_requests"]) for s in body] == [
        ("http://a:8000", 7.0),
        ("http://b:8000", 3.0),
    ]


@pytest.mark.parametrize("extra", [1, 15])
def test_operator_lists_cost_constant_queries(
    operator: Person, extra: int, django_assert_num_queries: Any
) -> None:
    for i in range(extra):
        person = make_person(f"user{i}")
        Plan.objects.create(name=f"plan{i}")
        ServedModel.objects.create(name=f"model{i}")
        _row(person.user, 10)
    client = operator.session()
    # Session + user for every call, then one query for the page.
    for path in ("users", "plans", "keys", "models", "upstreams"):
        with django_assert_num_queries(3):
            assert client.get(f"/api/v1/operator/{path}").status_code == 200, path


def test_an_operator_cannot_lock_themselves_out(operator: Person) -> None:
    client = operator_token(operator)
    for change in ({"is_staff": False}, {"is_active": False}):
        response = client.patch(f"/api/v1/operator/users/{operator.user.pk}", change, format="json")
        assert response.status_code == 400, change
    operator.user.refresh_from_db()
    assert operator.user.is_staff and operator.user.is_active


def test_the_default_plan_keeps_its_name(operator: Person) -> None:
    from quotas.services import default_plan

    plan = default_plan()
    response = operator_token(operator).patch(
        f"/api/v1/operator/plans/{plan.pk}", {"name": "renamed"}, format="json"
    )
    assert response.status_code == 400
    assert "name" in response.json()["error"]["fields"]


def test_names_and_times_from_outside_are_checked(operator: Person, alice: Person) -> None:
    client = operator_token(operator)
    for name in ("bad\nname", "tab\there", "nul\x00"):
        assert (
            client.post("/api/v1/operator/plans", {"name": name}, format="json").status_code == 400
        )
    ancient = {"expires_at": "1900-01-01T00:00:00Z"}
    response = client.patch(f"/api/v1/operator/keys/{alice.key.pk}", ancient, format="json")
    assert response.status_code == 400
    assert alice.client().get("/api/v1/usage?start=1900-01-01T00:00:00Z").status_code == 400
    assert client.get("/api/v1/operator/keys?cursor=garbage").status_code == 400


def test_users_are_found_by_part_of_their_name(
    operator: Person, alice: Person, bob: Person
) -> None:
    client = operator.session()
    found = client.get("/api/v1/operator/users?search=앨리").json()["results"]
    assert [user["username"] for user in found] == ["앨리스"]
    keys = client.get(f"/api/v1/operator/keys?user={bob.user.pk}").json()["results"]
    assert [key["id"] for key in keys] == [bob.key.pk]
    assert client.get("/api/v1/operator/keys?user=abc").status_code == 400
