"""An API key's life in the admin: state badges, revoke through a confirmation page (one key or
the bulk action), per-key limits at creation, and the raw key shown once in its own box."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.contrib.sessions.models import Session
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.admin import NEW_KEY_SESSION
from accounts.models import ApiKey, AuditAction, AuditEvent
from accounts.services import create_api_key, hash_key

pytestmark = pytest.mark.django_db

EN = {"accept-language": "en"}
LIST = "/admin/accounts/apikey/"
RAW_KEY = re.compile(r"sk-[A-Za-z0-9_-]{40,}")
# session, user, the count, the page (users joined), the full count.
KEY_LIST_QUERIES = 5
# session, user, the key with its user, its usage (the ledger), its audit history.
KEY_PAGE_QUERIES = 5


def page_url(key: ApiKey) -> str:
    return reverse("admin:accounts_apikey_change", args=[key.pk])


def revoke_url(key: ApiKey) -> str:
    return reverse("admin:accounts_apikey_revoke", args=[key.pk])


@pytest.fixture
def keys() -> dict[str, ApiKey]:
    user = User.objects.create_user("키주인")
    active = create_api_key(user, actor=None, name="활성")[0]
    expired = create_api_key(user, actor=None, name="만료")[0]
    revoked = create_api_key(user, actor=None, name="폐기")[0]
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(days=1))
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    return {"active": active, "expired": expired, "revoked": revoked}


def badge_of(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<span class="badge badge-(\w+)">([^<]*)</span>', page)


def test_the_list_and_the_page_show_the_state_as_a_badge(
    admin_client: Client, keys: dict[str, ApiKey]
) -> None:
    listing = admin_client.get(LIST, headers=EN).content.decode()

    assert sorted(badge_of(listing)) == [("bad", "revoked"), ("idle", "expired"), ("ok", "active")]
    for state, key in keys.items():
        page = admin_client.get(page_url(key), headers=EN).content.decode()
        assert [text for _level, text in badge_of(page)] == [state]


def test_the_key_page_has_a_revoke_button_unless_revoked(
    admin_client: Client, keys: dict[str, ApiKey]
) -> None:
    active = admin_client.get(page_url(keys["active"])).content.decode()
    revoked = admin_client.get(page_url(keys["revoked"])).content.decode()

    assert f'href="{revoke_url(keys["active"])}"' in active and 'id="revoke-key"' in active
    assert 'id="revoke-key"' not in revoked


def test_revoke_asks_first_then_revokes_with_an_audit_row(
    admin_client: Client, admin_user: User, keys: dict[str, ApiKey]
) -> None:
    key = keys["active"]

    asked = admin_client.get(revoke_url(key), headers=EN)

    page = asked.content.decode()
    assert asked.status_code == 200
    assert "cannot be undone" in page and f"{key.prefix}…" in page
    assert 'id="confirm-revoke"' in page and "csrfmiddlewaretoken" in page
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None

    done = admin_client.post(revoke_url(key), follow=True)

    assert done.redirect_chain[-1][0] == page_url(key)
    assert ApiKey.objects.get(pk=key.pk).state == "revoked"
    [event] = AuditEvent.objects.filter(action=AuditAction.KEY_REVOKED)
    assert event.actor == admin_user and event.target_id == key.pk
    # Again: nothing more to revoke, no second audit row.
    admin_client.post(revoke_url(key))
    assert AuditEvent.objects.filter(action=AuditAction.KEY_REVOKED).count() == 1


def test_revoke_needs_the_csrf_token(admin_user: User, keys: dict[str, ApiKey]) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)

    response = client.post(revoke_url(keys["active"]))

    assert response.status_code == 403
    assert ApiKey.objects.get(pk=keys["active"].pk).revoked_at is None


def test_revoke_needs_the_change_permission(keys: dict[str, ApiKey]) -> None:
    viewer = User.objects.create_user("보기만", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename="view_apikey"))
    client = Client()
    client.force_login(viewer)

    assert client.get(revoke_url(keys["active"])).status_code == 403
    assert client.post(revoke_url(keys["active"])).status_code == 403
    assert ApiKey.objects.get(pk=keys["active"].pk).revoked_at is None


def test_the_bulk_revoke_action_confirms_first(
    admin_client: Client, admin_user: User, keys: dict[str, ApiKey]
) -> None:
    chosen = [keys["active"].pk, keys["expired"].pk]
    action = {"action": "revoke_selected", "_selected_action": chosen}

    asked = admin_client.post(LIST, action, headers=EN)

    page = asked.content.decode()
    assert asked.status_code == 200 and "Revoking these 2 keys" in page
    assert ApiKey.objects.filter(pk__in=chosen, revoked_at__isnull=True).count() == 2
    assert page.count('name="_selected_action"') == 2

    done = admin_client.post(LIST, {**action, "post": "yes"}, follow=True, headers=EN)

    assert done.status_code == 200
    assert ApiKey.objects.filter(pk__in=chosen, revoked_at__isnull=True).count() == 0
    events = AuditEvent.objects.filter(action=AuditAction.KEY_REVOKED)
    assert {(e.target_id, e.actor_id) for e in events} == {(pk, admin_user.pk) for pk in chosen}
    assert any("2 keys revoked" in str(m) for m in get_messages(done.wsgi_request))


def test_a_new_key_gets_its_limits_and_is_shown_once_in_its_box(
    admin_client: Client, admin_user: User
) -> None:
    user = User.objects.create_user("새키")
    form = {
        "user": user.pk,
        "name": "서버",
        "expires_at_0": "",
        "expires_at_1": "",
        "tokens_per_minute": "1000",
        "tokens_per_day": "50000",
    }

    added = admin_client.post(reverse("admin:accounts_apikey_add"), form, headers=EN)

    key = ApiKey.objects.get(name="서버")
    new_url = reverse("admin:accounts_apikey_new", args=[key.pk])
    assert added.status_code == 302 and added["Location"] == new_url
    assert (key.tokens_per_minute, key.tokens_per_day, key.requests_per_minute) == (
        1000,
        50000,
        None,
    )
    actions = list(AuditEvent.objects.filter(target_id=key.pk).values_list("action", flat=True))
    assert sorted(actions) == [AuditAction.KEY_CHANGED, AuditAction.KEY_CREATED]

    shown = admin_client.get(new_url, headers=EN)

    page = shown.content.decode()
    [raw_key] = RAW_KEY.findall(page)
    assert hash_key(raw_key) == key.key_hash
    assert f'<code id="new-key-value" class="secret">{raw_key}</code>' in page
    assert 'data-copy="new-key-value"' in page
    assert "/static/portal/site.js" in page
    assert "cannot be shown again" in page
    assert "no-store" in shown["Cache-Control"]
    assert not [m for m in get_messages(shown.wsgi_request) if raw_key in str(m)]
    assert all(raw_key not in str(s.get_decoded()) for s in Session.objects.all())

    again = admin_client.get(new_url, headers=EN)

    assert raw_key not in again.content.decode()
    assert 'id="new-key-gone"' in again.content.decode()
    assert raw_key not in admin_client.get(page_url(key)).content.decode()


def test_the_one_time_page_shows_only_its_own_key(admin_client: Client) -> None:
    user = User.objects.create_user("두키")
    first = create_api_key(user, actor=None)[0]
    session = admin_client.session
    session[NEW_KEY_SESSION] = {"pk": first.pk + 1000, "raw": "sk-" + "x" * 43}
    session.save()

    page = admin_client.get(reverse("admin:accounts_apikey_new", args=[first.pk])).content.decode()

    assert "x" * 43 not in page


@pytest.mark.parametrize("count", [1, 30])
def test_the_key_list_costs_the_same_queries_for_1_and_30_keys(
    admin_client: Client, count: int, django_assert_num_queries: Callable[..., Any]
) -> None:
    for n in range(count):
        create_api_key(User.objects.create_user(f"목록{n}"), actor=None)

    with django_assert_num_queries(KEY_LIST_QUERIES):
        response = admin_client.get(LIST)

    assert response.context["cl"].result_count == count


def test_the_key_page_costs_a_fixed_number_of_queries(
    admin_client: Client, keys: dict[str, ApiKey], django_assert_num_queries: Callable[..., Any]
) -> None:
    admin_client.get(page_url(keys["expired"]))  # Django's content-type cache, once a process
    with django_assert_num_queries(KEY_PAGE_QUERIES):
        response = admin_client.get(page_url(keys["active"]))

    assert response.status_code == 200
