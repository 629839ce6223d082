"""Edits made on the admin's pages are audited like the services' changes: the acting admin,
each changed field old → new, in the same transaction. Plans, per-user quotas (their own page
and the user page's section) and served models."""

from __future__ import annotations

from typing import Any

import pytest
from django.forms import MultiWidget
from django.test import Client

from accounts.models import AuditAction, AuditEvent
from accounts.services import get_or_create_user
from quotas.models import Plan, UserQuota
from quotas.services import default_plan, set_user_quota

pytestmark = pytest.mark.django_db


def form_data(response: Any) -> dict[str, Any]:
    """The POST a browser would send back unchanged, from the admin change page's forms."""
    data: dict[str, Any] = {}
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        forms.append(formset.management_form)
        forms.extend(formset.forms)
    for form in forms:
        for name, field in form.fields.items():
            value = form[name].value()
            if value is None or value is False:
                continue
            key = form.add_prefix(name)
            if isinstance(field.widget, MultiWidget):  # a split date and time
                for index, part in enumerate(field.widget.decompress(value)):
                    data[f"{key}_{index}"] = part
            else:
                data[key] = value
    return data


def post_change(client: Client, url: str, **changes: Any) -> None:
    page = client.get(url)
    assert page.status_code == 200
    data = {**form_data(page), **changes}
    response = client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]


def test_a_plan_edit_is_audited_with_the_admin_and_old_new(
    admin_client: Client, admin_user: Any
) -> None:
    plan = Plan.objects.create(name="기본형", tokens_per_minute=8000)
    post_change(admin_client, f"/admin/quotas/plan/{plan.pk}/change/", tokens_per_minute=12000)
    [event] = AuditEvent.objects.filter(action=AuditAction.PLAN_CHANGED)
    assert event.actor == admin_user and event.target_label == "기본형"
    assert event.details == {"tokens_per_minute": {"old": 8000, "new": 12000}}
    post_change(admin_client, f"/admin/quotas/plan/{plan.pk}/change/")  # saved unchanged
    assert AuditEvent.objects.filter(action=AuditAction.PLAN_CHANGED).count() == 1


def test_a_quota_edit_on_its_page_and_on_the_user_page_is_audited(
    admin_client: Client, admin_user: Any
) -> None:
    user, _ = get_or_create_user("할당량편집")
    quota, _ = set_user_quota(user, default_plan(), actor=None, tokens_per_minute=100)
    before = AuditEvent.objects.count()
    post_change(admin_client, f"/admin/quotas/userquota/{quota.pk}/change/", tokens_per_minute=200)
    post_change(
        admin_client, f"/admin/auth/user/{user.pk}/change/", **{"quota-0-tokens_per_minute": 300}
    )
    events = list(AuditEvent.objects.order_by("pk")[before:])
    assert [e.details for e in events] == [
        {"tokens_per_minute": {"old": 100, "new": 200}},
        {"tokens_per_minute": {"old": 200, "new": 300}},
    ]
    assert {(e.action, e.actor, e.target_id) for e in events} == {
        (AuditAction.QUOTA_CHANGED, admin_user, user.pk)
    }
    assert UserQuota.objects.get(pk=quota.pk).tokens_per_minute == 300


def test_a_served_model_edit_is_audited(admin_client: Client, admin_user: Any) -> None:
    from gateway.models import ServedModel

    model = ServedModel.objects.create(name="감사-모델", upstream_url="http://127.0.0.1:9")
    post_change(admin_client, f"/admin/gateway/servedmodel/{model.pk}/change/", context_length=8192)
    [event] = AuditEvent.objects.filter(action=AuditAction.MODEL_CHANGED)
    assert event.actor == admin_user and event.details["context_length"]["new"] == 8192
