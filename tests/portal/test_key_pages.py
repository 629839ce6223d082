"""내 API 키: the raw key shown once (never stored), revoke after a confirmation with CSRF, the
plan's policy, and one user never touching another's keys."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone, translation

from accounts.models import ApiKey, AuditEvent
from accounts.services import hash_key
from quotas.models import Plan
from quotas.services import default_plan
from tests.api.conftest import Person
from tests.portal.conftest import logged_in, text

pytestmark = pytest.mark.django_db


def _csrf(client: Client, path: str = "/keys/") -> str:
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', text(client.get(path)))
    assert found
    return found.group(1)


def test_a_created_key_is_shown_once_works_and_is_never_shown_again(alice: Person) -> None:
    client = logged_in(alice, csrf=True)
    response = client.post(
        "/keys/", {"name": "노트북", "expires_on": "", "csrfmiddlewaretoken": _csrf(client)}
    )
    assert response.status_code == 200
    assert (
        response["Cache-Control"].startswith("max-age=0") or "no-store" in response["Cache-Control"]
    )
    page = text(response)
    raw = re.search(r"data-new-key>(sk-[^<]+)<", page)
    assert raw, "the new key is in the dialog"
    assert "data-open-on-load" in page and 'data-copy="new-key-value"' in page
    key = ApiKey.objects.get(key_hash=hash_key(raw.group(1)))
    assert (key.user, key.name, key.state) == (alice.user, "노트북", "active")
    # Audited with the user as the actor, without the raw key.
    event = AuditEvent.objects.get(action="key_created", target_id=key.pk)
    assert event.actor == alice.user and raw.group(1) not in str(event.details)
    # The next page view does not have it; neither does the session.
    again = text(client.get("/keys/"))
    assert raw.group(1) not in again and "data-new-key" not in again
    assert raw.group(1) not in str(dict(client.session))
    assert f"<code>{key.prefix}…</code>" in again


def test_expiry_is_the_end_of_the_chosen_day_in_seoul(alice: Person) -> None:
    client = logged_in(alice)
    day = (timezone.localtime() + timedelta(days=3)).date()
    client.post("/keys/", {"name": "", "expires_on": day.isoformat()})
    key = ApiKey.objects.filter(user=alice.user).latest("created_at")
    assert key.expires_at is not None
    local = timezone.localtime(key.expires_at)
    assert (local.date(), local.hour, local.minute) == (day + timedelta(days=1), 0, 0)
    assert local.utcoffset() == timedelta(hours=9)


def test_a_past_expiry_or_an_overlong_name_is_refused_in_words(alice: Person) -> None:
    client = logged_in(alice, language="en")
    before = ApiKey.objects.count()
    with translation.override("en"):
        yesterday = (timezone.localtime() - timedelta(days=1)).date().isoformat()
        response = client.post("/keys/", {"name": "x", "expires_on": yesterday})
        assert response.status_code == 400
        assert "Choose today or a later day." in text(response)
        response = client.post("/keys/", {"name": "x" * 101})
        assert response.status_code == 400
    assert ApiKey.objects.count() == before


def test_revoke_needs_csrf_and_then_refuses_the_key(alice: Person) -> None:
    client = logged_in(alice, csrf=True)
    assert client.post(f"/keys/{alice.key.pk}/revoke/").status_code == 403  # no token
    alice.key.refresh_from_db()
    assert alice.key.state == "active"
    response = client.post(f"/keys/{alice.key.pk}/revoke/", {"csrfmiddlewaretoken": _csrf(client)})
    assert response.status_code == 302 and response["Location"] == "/keys/"
    alice.key.refresh_from_db()
    assert alice.key.state == "revoked"
    event = AuditEvent.objects.get(action="key_revoked", target_id=alice.key.pk)
    assert event.actor == alice.user
    page = text(client.get("/keys/"))
    assert 'data-state="revoked"' in page
    # A revoked key has no revoke button any more.
    assert f'data-open-dialog="revoke-{alice.key.pk}"' not in page


def test_revoke_is_confirmed_in_a_dialog_first(alice: Person) -> None:
    page = text(logged_in(alice).get("/keys/"))
    dialog = page.split(f'<dialog id="revoke-{alice.key.pk}"', 1)[1].split("</dialog>", 1)[0]
    assert f'action="/keys/{alice.key.pk}/revoke/"' in dialog
    assert 'method="post"' in dialog and "data-close-dialog" in dialog


def test_nobody_sees_or_revokes_another_users_key(alice: Person, bob: Person) -> None:
    page = text(logged_in(alice).get("/keys/"))
    assert bob.key.prefix not in page
    assert logged_in(alice).post(f"/keys/{bob.key.pk}/revoke/").status_code == 404
    bob.key.refresh_from_db()
    assert bob.key.state == "active"
    assert logged_in(alice).get(f"/keys/{bob.key.pk}/revoke/").status_code == 405


def test_the_plan_decides_self_service_and_the_number_of_keys(alice: Person) -> None:
    plan: Plan = default_plan()
    plan.max_keys_per_user = 1
    plan.save()
    client = logged_in(alice, language="en")
    with translation.override("en"):
        page = text(client.get("/keys/"))
        assert "1 of 1 active keys" in page and 'id="new-key-form"' not in page
        response = client.post("/keys/", {"name": "second"}, follow=True)
        assert "revoke one first" in text(response)
    assert ApiKey.objects.filter(user=alice.user).count() == 1
    plan.self_service_keys = False
    plan.save()
    with translation.override("en"):
        page = text(client.get("/keys/"))
        assert "does not let you manage your own API keys" in page
        assert "data-open-dialog" not in page
        response = client.post(f"/keys/{alice.key.pk}/revoke/", follow=True)
        assert "does not let you manage your own API keys" in text(response)
    alice.key.refresh_from_db()
    assert alice.key.state == "active"


def test_keys_page_query_count_does_not_grow_with_keys(
    alice: Person, django_assert_num_queries: Any
) -> None:
    from accounts.services import create_api_key

    client = logged_in(alice)
    client.get("/keys/")
    # Session, user, the plan (quota with its plan), the keys.
    with django_assert_num_queries(4):
        client.get("/keys/")
    for n in range(20):
        create_api_key(alice.user, actor=None, name=f"k{n}")
    with django_assert_num_queries(4):
        assert text(client.get("/keys/")).count("data-key-id=") == 21
