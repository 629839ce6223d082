"""A plan's request policy: which extra fields it may enable, and what each key carries."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from accounts.services import create_api_key
from quotas.models import Plan
from quotas.request_policy import GATEWAY_OWNED_FIELDS, validate_extra_fields
from quotas.services import load_key_grant, set_user_quota


@pytest.mark.parametrize("names", [[], ["ignore_eos"], ["return_hidden_states", "sim"]])
def test_extensions_and_custom_names_may_be_enabled(names: list[str]) -> None:
    validate_extra_fields(names)


@pytest.mark.parametrize(
    "names",
    [
        "ignore_eos",
        [5],
        ["bad name"],
        ["x" * 65],
        *([field] for field in sorted(GATEWAY_OWNED_FIELDS)),
        ["lora_path"],
        ["messages"],
        ["model"],
    ],
)
def test_gateway_fields_and_bad_names_cannot_be_enabled(names: Any) -> None:
    with pytest.raises(ValidationError):
        validate_extra_fields(names)


@pytest.mark.django_db
def test_the_admin_form_refuses_a_gateway_field(admin_client: Any) -> None:
    plan = Plan.objects.create(name="연구")
    fields = {f.name: getattr(plan, f.name) for f in Plan._meta.fields if f.name != "id"}
    response = admin_client.post(
        f"/admin/quotas/plan/{plan.pk}/change/",
        {**fields, "priority": "", "allowed_models": "[]", "extra_request_fields": '["rid"]'},
    )
    assert response.status_code == 200  # the form again, with the error
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["extra_request_fields"]
    plan.refresh_from_db()
    assert plan.extra_request_fields == []


@pytest.mark.django_db
def test_a_key_carries_its_plans_policy_in_one_query(django_assert_num_queries: Any) -> None:
    plan = Plan.objects.create(
        name="격리", extra_request_fields=["ignore_eos"], priority=3, isolate_prefix_cache=True
    )
    first, second = User.objects.create(username="가"), User.objects.create(username="나")
    keys = []
    for user in (first, second):
        set_user_quota(user, plan, actor=None)
        keys.append(create_api_key(user, actor=None)[0])
    with django_assert_num_queries(1):
        grant = load_key_grant(keys[0].key_hash)
    assert grant is not None
    assert grant.access.extra_fields == frozenset({"ignore_eos"})
    assert grant.access.priority == 3
    other = load_key_grant(keys[1].key_hash)
    assert other is not None
    assert grant.access.cache_salt and other.access.cache_salt
    assert grant.access.cache_salt != other.access.cache_salt  # one salt per user
    plan.isolate_prefix_cache = False
    plan.save()
    again = load_key_grant(keys[0].key_hash)
    assert again is not None and again.access.cache_salt is None
