"""The audit log: every change made through the services records who made it, in the same
transaction, and the admin shows a key's history without a query per row."""

from __future__ import annotations

import json
import re
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import translation
from django.utils.dateparse import parse_datetime

from accounts.models import ApiKey, AuditAction, AuditEvent
from accounts.services import (
    QUICK_START_KEYS,
    SYSTEM_LABEL,
    audit_target,
    create_api_key,
    revoke_api_keys,
    update_api_key,
)
from quotas.models import Plan
from quotas.services import default_plan, set_plan_limits, set_user_quota

CONFIG = Path(settings.BASE_DIR) / "config"
RAW_KEY = re.compile(r"sk-[A-Za-z0-9_-]{20,}")

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


@pytest.fixture
def operator() -> User:
    return User.objects.create_user("키관리자", is_staff=True)


@pytest.fixture
def member() -> User:
    return User.objects.create_user("홍길동")


@pytest.fixture
def superuser() -> User:
    return User.objects.create_superuser("최고관리자", "root@example.com", "pw")


@pytest.fixture
def client(superuser: User) -> Client:
    client = Client()
    client.force_login(superuser)
    return client


def events_of(target: Any) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(**audit_target(type(target), target.pk)))


def only_event(target: Any) -> AuditEvent:
    events = events_of(target)
    assert len(events) == 1, events
    return events[0]


def all_details() -> str:
    return json.dumps(list(AuditEvent.objects.values_list("details", flat=True)))


def url(model: type[Any], view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


# --- Through the services -----------------------------------------------------------------------


def test_creating_a_key_records_the_actor_and_never_the_raw_key(
    operator: User, member: User
) -> None:
    key, raw = create_api_key(member, actor=operator, name="노트북")

    event = only_event(key)
    assert event.action == AuditAction.KEY_CREATED
    assert (event.actor, event.actor_label) == (operator, "키관리자")
    assert event.target_label == f"{key.prefix}…"
    assert event.details["user"] == "홍길동" and event.details["name"] == "노트북"
    assert event.details["prefix"] == key.prefix
    assert raw not in all_details() and key.key_hash not in all_details()


def test_revoking_records_one_row_per_key_and_none_when_already_revoked(
    operator: User, member: User
) -> None:
    first, _ = create_api_key(member, actor=None)
    second, _ = create_api_key(member, actor=None)

    assert revoke_api_keys([first], key_ids=[second.pk], actor=operator) == 2
    assert revoke_api_keys([first, second], actor=operator) == 0

    for key in (first, second):
        revoked = [e for e in events_of(key) if e.action == AuditAction.KEY_REVOKED]
        assert len(revoked) == 1
        assert revoked[0].actor == operator
        key.refresh_from_db()
        assert key.revoked_at is not None
        assert revoked[0].details["revoked_at"]["old"] is None
        # DjangoJSONEncoder keeps milliseconds, as JavaScript's dates do.
        recorded = revoked[0].details["revoked_at"]["new"]
        # Shown as the admin shows times: Asia/Seoul, to the second.
        assert recorded.endswith("+09:00")
        assert parse_datetime(recorded) == key.revoked_at.replace(microsecond=0)


def test_changing_a_key_records_only_the_changed_fields(operator: User, member: User) -> None:
    key, _ = create_api_key(member, actor=None, name="old")
    AuditEvent.objects.all().delete()

    assert update_api_key(key, actor=operator, name="new", expires_at=None, tokens_per_day=500)
    assert not update_api_key(key, actor=operator, name="new", expires_at=None, tokens_per_day=500)

    event = only_event(key)
    assert event.action == AuditAction.KEY_CHANGED
    assert event.details == {
        "name": {"old": "old", "new": "new"},
        "tokens_per_day": {"old": None, "new": 500},
    }


def test_a_quota_change_records_old_and_new_values_once(operator: User, member: User) -> None:
    pro = Plan.objects.create(name="pro")

    set_user_quota(member, default_plan(), actor=operator, tokens_per_day=5000)
    created = only_event(member)
    assert created.action == AuditAction.QUOTA_CHANGED and created.actor == operator
    assert created.details == {
        "plan": {"old": None, "new": "default"},
        "tokens_per_day": {"old": None, "new": 5000},
    }

    _quota, changed = set_user_quota(member, default_plan(), actor=operator, tokens_per_day=5000)
    assert not changed and len(events_of(member)) == 1

    set_user_quota(member, pro, actor=operator, tokens_per_day=6000, description="")
    newest = events_of(member)[0]
    assert newest.details == {
        "plan": {"old": "default", "new": "pro"},
        "tokens_per_day": {"old": 5000, "new": 6000},
    }
    assert len(events_of(member)) == 2


def test_a_plan_change_records_old_and_new_values_once(operator: User) -> None:
    plan = default_plan()
    before = plan.tokens_per_day

    assert set_plan_limits(plan, actor=operator, tokens_per_day=before + 1)
    assert not set_plan_limits(plan, actor=operator, tokens_per_day=before + 1)

    event = only_event(plan)
    assert event.action == AuditAction.PLAN_CHANGED
    assert (event.actor, event.target_label) == (operator, "default")
    assert event.details == {"tokens_per_day": {"old": before, "new": before + 1}}


def test_without_an_actor_the_label_names_the_command(member: User) -> None:
    named, _ = create_api_key(member, actor=None, actor_label="import_config")
    unnamed, _ = create_api_key(member, actor=None)
    long, _ = create_api_key(member, actor=None, actor_label="x" * 500)

    assert (only_event(named).actor, only_event(named).actor_label) == (None, "import_config")
    assert only_event(unnamed).actor_label == SYSTEM_LABEL
    assert only_event(long).actor_label == "x" * 150  # clamped to the column


def test_the_change_and_its_record_are_one_transaction(
    operator: User, member: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("audit write failed")

    monkeypatch.setattr("accounts.services.record_audit", broken)
    monkeypatch.setattr("quotas.services.record_audit", broken)
    plan = default_plan()
    before = plan.tokens_per_day

    with pytest.raises(RuntimeError):
        create_api_key(member, actor=operator)
    with pytest.raises(RuntimeError):
        set_plan_limits(plan, actor=operator, tokens_per_day=before + 1)
    with pytest.raises(RuntimeError):
        set_user_quota(member, plan, actor=operator)

    plan.refresh_from_db()
    assert not ApiKey.objects.exists() and plan.tokens_per_day == before
    assert not hasattr(User.objects.get(pk=member.pk), "quota")


def test_a_deleted_actor_stays_named(operator: User, member: User) -> None:
    key, _ = create_api_key(member, actor=operator)
    operator.delete()

    event = only_event(key)
    assert (event.actor, event.actor_label) == (None, "키관리자")


def test_import_config_is_recorded_as_import_config(settings: Any) -> None:
    settings.DEBUG = True  # the shipped quick-start keys are imported only with DEBUG
    files = [str(CONFIG / "sglang_korean.yaml"), str(CONFIG / "korean_users.yaml")]
    call_command("import_config", *files, verbosity=0, stderr=StringIO())
    written = AuditEvent.objects.count()
    call_command("import_config", *files, verbosity=0, stderr=StringIO())

    assert written > 0 and AuditEvent.objects.count() == written  # a re-import changes nothing
    assert set(AuditEvent.objects.values_list("actor_id", "actor_label")) == {
        (None, "import_config")
    }
    assert {AuditAction.KEY_CREATED, AuditAction.QUOTA_CHANGED} <= set(
        AuditEvent.objects.values_list("action", flat=True)
    )
    details = all_details()
    assert not any(raw in details for raw in QUICK_START_KEYS)
    assert not RAW_KEY.search(details)


# --- In the admin -------------------------------------------------------------------------------


def test_keys_made_in_the_admin_record_the_admin_user(client: Client, superuser: User) -> None:
    member = User.objects.create_user("홍길동")
    response = client.post(url(ApiKey, "add"), {"user": member.pk, "name": "관리자가 만든 키"})

    assert response.status_code == 302
    event = only_event(ApiKey.objects.get())
    assert (event.action, event.actor) == (AuditAction.KEY_CREATED, superuser)
    assert not RAW_KEY.search(all_details())


def test_the_bulk_revoke_action_records_the_admin_user(
    client: Client, superuser: User, member: User
) -> None:
    keys = [create_api_key(member, actor=None)[0] for _ in range(2)]

    response = client.post(
        url(ApiKey, "changelist"),
        # "post": the confirmation page's answer (the action asks first).
        {"action": "revoke_selected", "_selected_action": [k.pk for k in keys], "post": "yes"},
    )

    assert response.status_code == 302
    revoked = AuditEvent.objects.filter(action=AuditAction.KEY_REVOKED)
    assert sorted(revoked.values_list("target_id", flat=True)) == sorted(k.pk for k in keys)
    assert {(e.actor, e.actor_label) for e in revoked} == {(superuser, "최고관리자")}


def history_of(page: str) -> str:
    """The key page's history field alone (the page's header also names the logged-in user)."""
    start = page.index("field-history")
    return page[start : page.index("</div>", page.index("</table>", start))]


def test_the_key_page_lists_its_history(
    client: Client, operator: User, member: User, superuser: User
) -> None:
    key, raw = create_api_key(member, actor=operator, name="노트북")
    create_api_key(member, actor=None, name="다른 키")
    revoke_api_keys([key], actor=superuser)

    response = client.get(url(ApiKey, "change", key.pk))

    assert response.status_code == 200
    history = history_of(response.content.decode())
    with translation.override(response.headers["Content-Language"]):
        created, revoked = str(AuditAction.KEY_CREATED.label), str(AuditAction.KEY_REVOKED.label)
    assert "키관리자" in history and created in history
    assert "최고관리자" in history and revoked in history
    assert "노트북" in history and "다른 키" not in history  # only this key's events
    assert raw not in response.content.decode()


def test_a_long_history_links_to_the_key_s_events_in_the_audit_log(
    client: Client, operator: User, member: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("accounts.admin.HISTORY_ROWS", 2)
    key, _ = create_api_key(member, actor=operator)
    create_api_key(member, actor=operator)  # another key's event: not in this key's list
    for name in ("하나", "둘"):
        update_api_key(key, actor=operator, name=name, expires_at=None)

    history = history_of(client.get(url(ApiKey, "change", key.pk)).content.decode())
    link = re.search(r'href="([^"]+)"', history)

    assert link is not None and history.count("<tr>") == 1 + 2  # the header and two rows
    listing = client.get(link.group(1).replace("&amp;", "&"))
    assert listing.status_code == 200 and listing.context["cl"].result_count == 3


def test_the_key_page_costs_the_same_queries_however_long_its_history(
    client: Client, operator: User, member: User
) -> None:
    key, _ = create_api_key(member, actor=operator)
    counts = []
    for name in ("하나", "둘", "셋"):
        update_api_key(key, actor=operator, name=name, expires_at=None)
        with CaptureQueriesContext(connection) as queries:
            assert client.get(url(ApiKey, "change", key.pk)).status_code == 200
        counts.append(len(queries))
    assert len(set(counts)) == 1, counts


def make_events(count: int, actor: User, member: User) -> None:
    for n in range(count):
        create_api_key(member, actor=actor, name=f"키 {n}")


# The session, the logged-in user, the count and the page's rows (actors joined): the same for
# any number of rows.
CHANGELIST_QUERIES = 4


@pytest.mark.parametrize("events", [1, 5])
def test_the_audit_changelist_costs_constant_queries(
    client: Client,
    operator: User,
    member: User,
    events: int,
    django_assert_num_queries: Any,
) -> None:
    make_events(events, operator, member)

    with django_assert_num_queries(CHANGELIST_QUERIES):
        response = client.get(url(AuditEvent, "changelist"))

    assert response.status_code == 200
    assert response.content.decode().count("키관리자") == events


def test_the_audit_changelist_filters_and_searches(
    client: Client, operator: User, member: User, superuser: User
) -> None:
    make_events(2, operator, member)
    revoke_api_keys(list(ApiKey.objects.all()[:1]), actor=superuser)

    by_actor = client.get(url(AuditEvent, "changelist"), {"q": "키관리자"})
    by_action = client.get(url(AuditEvent, "changelist"), {"action__exact": "key_revoked"})

    assert by_actor.context["cl"].result_count == 2
    assert by_action.context["cl"].result_count == 1


def test_the_audit_log_cannot_be_added_changed_or_deleted(
    client: Client, operator: User, member: User
) -> None:
    make_events(1, operator, member)
    event = AuditEvent.objects.get()

    assert client.get(url(AuditEvent, "add")).status_code == 403
    assert client.post(url(AuditEvent, "delete", event.pk), {"post": "yes"}).status_code == 403
    assert client.post(url(AuditEvent, "change", event.pk), {"actor_label": "x"}).status_code == 403
    view = client.get(url(AuditEvent, "change", event.pk))
    assert view.status_code == 200 and 'name="_save"' not in view.content.decode()
    assert AuditEvent.objects.get().actor_label == "키관리자"
