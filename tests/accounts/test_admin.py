"""The Django admin: every model's pages, API keys shown once, the read-only ledger."""

from __future__ import annotations

import re
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from accounts.models import ApiKey
from accounts.services import create_api_key, hash_key
from gateway.models import ServedModel
from quotas.admin import EstimatedCountPaginator
from quotas.models import Plan, UsageRecord, UserQuota
from quotas.services import load_key_grant

CONFIG = Path(settings.BASE_DIR) / "config"
MODEL = "Qwen/Qwen2.5-7B-Instruct"
RAW_KEY = re.compile(r"sk-[A-Za-z0-9_-]{40,}")

pytestmark = pytest.mark.django_db


@pytest.fixture
def data(settings: Any) -> None:
    settings.DEBUG = True  # the shipped quick-start keys are imported only with DEBUG
    call_command(
        "import_config",
        str(CONFIG / "sglang_korean.yaml"),
        str(CONFIG / "korean_users.yaml"),
        verbosity=0,
        stderr=StringIO(),
    )
    settings.DEBUG = False
    user = User.objects.get(username="한국어개발자")
    key = ApiKey.objects.filter(user=user).get()
    now = timezone.now()
    UsageRecord.objects.bulk_create(
        UsageRecord(
            request_id=f"req-{n}",
            user=user,
            api_key=key,
            model=MODEL,
            endpoint="chat/completions",
            prompt_tokens=20,
            completion_tokens=n,
            status_code=429 if n % 2 else 200,
            streamed=bool(n % 3),
            started_at=now - timedelta(minutes=n),
            finished_at=now - timedelta(minutes=n) + timedelta(seconds=1),
        )
        for n in range(5)
    )


@pytest.fixture
def client() -> Client:
    superuser = User.objects.create_superuser("최고관리자", "root@example.com", "pw")
    client = Client()
    client.force_login(superuser)
    return client


def url(model: type[Any], view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


# --- Every page loads ---------------------------------------------------------------------------

MODELS = [User, ApiKey, Plan, UserQuota, UsageRecord, ServedModel]


@pytest.mark.parametrize("model", MODELS)
def test_changelists_load(client: Client, data: None, model: type[Any]) -> None:
    response = client.get(url(model, "changelist"))

    assert response.status_code == 200
    if model is not Plan and model is not ServedModel:
        assert "한국어개발자" in response.content.decode()


@pytest.mark.parametrize("model", MODELS)
def test_change_pages_load(client: Client, data: None, model: type[Any]) -> None:
    obj = model.objects.order_by("pk").last()

    response = client.get(url(model, "change", obj.pk))

    assert response.status_code == 200


@pytest.mark.parametrize(
    "query",
    [
        {"q": "한국어개발자"},
        {"q": "req-3"},
        {"status": "429"},
        {"status": "5xx"},
        {"model": MODEL},
        {"streamed__exact": "1"},
        {"usage_source__exact": "upstream"},
        {"started_at__gte": "2020-01-01 00:00:00+09:00"},
    ],
)
def test_ledger_search_and_filters(client: Client, data: None, query: dict[str, str]) -> None:
    response = client.get(url(UsageRecord, "changelist"), query)

    assert response.status_code == 200
    assert response.context["cl"].result_count == len(response.context["cl"].result_list)


@pytest.mark.parametrize(
    ("term", "expected"),
    [("한국어개발자", 5), ("개발", 5), ("req-3", 1), ("req", 0), ("sk-dev", 5), ("sk-zzz", 0)],
)
def test_ledger_search_reads_the_ledger_by_index(
    client: Client, data: None, term: str, expected: int
) -> None:
    """Partial usernames and key prefixes are resolved in the small tables first; the ledger
    itself is only read by request id, user id or key id (no LIKE, no UPPER on it)."""
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url(UsageRecord, "changelist"), {"q": term})

    assert response.context["cl"].result_count == expected
    ledger = [
        q["sql"].upper()
        for q in queries.captured_queries
        if "QUOTAS_USAGERECORD" in q["sql"].upper()
    ]
    assert ledger and not [sql for sql in ledger if "UPPER(" in sql or " LIKE " in sql]


def test_ledger_status_filter_counts(client: Client, data: None) -> None:
    response = client.get(url(UsageRecord, "changelist"), {"status": "429"})

    assert response.context["cl"].result_count == 2


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"revoked": "yes"}, 1),
        ({"revoked": "no"}, 4),
        ({"expired": "yes"}, 1),
        ({"q": "사용자1"}, 1),
    ],
)
def test_key_filters(client: Client, data: None, query: dict[str, str], expected: int) -> None:
    ApiKey.objects.filter(user__username="테스트").update(revoked_at=timezone.now())
    ApiKey.objects.filter(user__username="admin").update(expires_at=timezone.now())

    response = client.get(url(ApiKey, "changelist"), query)

    assert response.context["cl"].result_count == expected


def test_user_page_has_the_quota_inline(client: Client, data: None) -> None:
    user = User.objects.get(username="사용자1")

    response = client.get(url(User, "change", user.pk))

    assert 'name="quota-0-requests_per_minute"' in response.content.decode()


def test_user_quota_list_shows_effective_limits(client: Client, data: None) -> None:
    response = client.get(url(UserQuota, "changelist"), {"q": "개발자1"})
    page = response.content.decode()

    assert "<b>60</b>" in page  # an override
    assert ">500000<" in page  # tph from the plan


# --- API keys -----------------------------------------------------------------------------------


def test_adding_a_key_shows_the_raw_key_once(client: Client, data: None) -> None:
    user = User.objects.get(username="사용자1")
    form = {"user": user.pk, "name": "노트북", "expires_at_0": "", "expires_at_1": ""}

    response = client.post(url(ApiKey, "add"), form, follow=True)

    assert response.status_code == 200
    assert not [m for m in messages_of(response) if RAW_KEY.search(m)]  # never a flash message
    raw_key = RAW_KEY.findall(response.content.decode())[0]
    key = ApiKey.objects.get(name="노트북")
    assert key.user == user
    assert key.key_hash == hash_key(raw_key)
    assert key.prefix == raw_key[:11]
    assert not key.imported
    assert raw_key not in {key.name, key.prefix, key.key_hash}
    assert raw_key not in str(list(LogEntry.objects.values()))
    assert all(raw_key not in str(s.get_decoded()) for s in Session.objects.all())

    again = client.get(url(ApiKey, "change", key.pk))

    assert raw_key not in again.content.decode()
    assert key.key_hash not in again.content.decode()


def test_the_add_form_asks_for_user_name_expiry_and_key_limits(client: Client) -> None:
    response = client.get(url(ApiKey, "add"))

    assert list(response.context["adminform"].form.fields) == [
        "user",
        "name",
        "expires_at",
        "requests_per_minute",
        "tokens_per_minute",
        "tokens_per_hour",
        "tokens_per_day",
        "max_parallel_requests",
    ]


def test_editing_a_key_changes_only_name_expiry_and_its_limits(client: Client, data: None) -> None:
    key = ApiKey.objects.get(user__username="사용자1")
    other = User.objects.get(username="테스트")
    page = client.get(url(ApiKey, "change", key.pk))
    assert list(page.context["adminform"].form.fields) == [
        "name",
        "expires_at",
        "requests_per_minute",
        "tokens_per_minute",
        "tokens_per_hour",
        "tokens_per_day",
        "max_parallel_requests",
    ]
    # Revoked by someone else while this form was open: saving must not undo it.
    ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())
    form = {
        "name": "새 이름",
        "expires_at_0": "2030-01-01",
        "expires_at_1": "12:00:00",
        "user": other.pk,
        "revoked_at_0": "",
        "key_hash": "0" * 64,
        "tokens_per_minute": "500",
    }

    response = client.post(url(ApiKey, "change", key.pk), form)

    assert response.status_code == 302
    key.refresh_from_db()
    assert key.tokens_per_minute == 500 and key.requests_per_minute is None
    grant = load_key_grant(key.key_hash)
    assert grant is not None and grant.key_limits is not None
    assert grant.key_limits.tokens_per_minute == 500 and grant.key_limits.requests_per_minute == 0
    assert grant.key_limits.cooldown_minutes == grant.limits.cooldown_minutes
    assert key.name == "새 이름"
    assert key.expires_at is not None and key.expires_at.year == 2030
    assert key.user.username == "사용자1"
    assert key.revoked_at is not None
    assert key.key_hash == hash_key("sk-user1-korean-key-def")


def test_revoke_action(client: Client, data: None) -> None:
    keys = list(ApiKey.objects.filter(user__username__in=["admin", "테스트"]))

    response = client.post(
        url(ApiKey, "changelist"),
        {"action": "revoke_selected", "_selected_action": [k.pk for k in keys], "post": "yes"},
        follow=True,
    )

    assert response.status_code == 200
    assert ApiKey.objects.filter(revoked_at__isnull=False).count() == 2
    assert {k.pk for k in ApiKey.objects.filter(revoked_at__isnull=False)} == {k.pk for k in keys}
    assert any("2" in m for m in messages_of(response))


def test_the_key_hash_is_never_shown(client: Client) -> None:
    user = User.objects.create_user("홍길동")
    key, _raw = create_api_key(user, actor=None)

    pages = [
        client.get(url(ApiKey, "changelist")),
        client.get(url(ApiKey, "change", key.pk)),
        client.get(url(ApiKey, "changelist"), {"q": key.key_hash[:10]}),
    ]

    for page in pages:
        assert key.key_hash not in page.content.decode()


# --- The ledger ---------------------------------------------------------------------------------


def test_the_ledger_cannot_be_added_changed_or_deleted(client: Client, data: None) -> None:
    record = UsageRecord.objects.first()
    assert record is not None

    assert client.get(url(UsageRecord, "add")).status_code == 403
    assert client.post(url(UsageRecord, "delete", record.pk), {"post": "yes"}).status_code == 403
    view = client.get(url(UsageRecord, "change", record.pk))
    changed = client.post(url(UsageRecord, "change", record.pk), {"prompt_tokens": 1})
    listing = client.get(url(UsageRecord, "changelist"))

    assert view.status_code == 200 and 'name="_save"' not in view.content.decode()
    assert changed.status_code == 403
    assert UsageRecord.objects.get(pk=record.pk).prompt_tokens == 20
    assert url(UsageRecord, "add") not in listing.content.decode()
    assert "delete_selected" not in listing.content.decode()
    assert UsageRecord.objects.count() == 5


def test_the_paginator_caps_its_count(monkeypatch: pytest.MonkeyPatch, data: None) -> None:
    monkeypatch.setattr(EstimatedCountPaginator, "cap", 3)

    with CaptureQueriesContext(connection) as queries:
        count = EstimatedCountPaginator(
            UsageRecord.objects.filter(prompt_tokens=20).order_by("pk"), 2
        ).count

    assert count == 4  # cap + 1: "more than 3"
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert len(counts) == 1 and "LIMIT 4" in counts[0]
    assert (
        EstimatedCountPaginator(UsageRecord.objects.filter(status_code=429).order_by("pk"), 2).count
        == 2
    )


def test_the_ledger_list_never_counts_a_whole_table(client: Client, data: None) -> None:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url(UsageRecord, "changelist"))

    assert response.status_code == 200
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert all("LIMIT" in sql.upper() for sql in counts), counts


@pytest.mark.postgres
def test_unfiltered_ledger_uses_the_planner_estimate_on_postgres(
    client: Client, data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE quotas_usagerecord")  # reltuples is -1 until analysed
    monkeypatch.setattr(EstimatedCountPaginator, "cap", 2)

    with CaptureQueriesContext(connection) as queries:
        response = client.get(url(UsageRecord, "changelist"))

    assert response.status_code == 200
    sql = [q["sql"].upper() for q in queries.captured_queries]
    assert not [s for s in sql if "COUNT(" in s], sql
    assert any("RELTUPLES" in s for s in sql)
    assert response.context["cl"].result_count == 5  # the estimate: exact after ANALYZE
    filtered = client.get(url(UsageRecord, "changelist"), {"status": "429"})
    assert filtered.context["cl"].result_count == 2  # filtered: counted (within the cap)


# --- Served models ------------------------------------------------------------------------------


def test_served_model_aliases_must_be_free(client: Client, data: None) -> None:
    form = {
        "name": "other-model",
        "aliases": "korean-qwen\n",
        "upstream_url": "http://gpu-2:8000",
        "tokenizer": "",
        "context_length": 8192,
        "korean_factor": "",
        "request_timeout_seconds": 60,
        "max_concurrent_requests": 0,
        "is_active": "on",
        "description": "",
        "upstream_kind": "auto",
        "prompt_token_offset": 0,
        # The self-check history inline (read-only) still posts its management form.
        "tokenizer_checks-TOTAL_FORMS": "0",
        "tokenizer_checks-INITIAL_FORMS": "0",
    }

    refused = client.post(url(ServedModel, "add"), form)
    accepted = client.post(url(ServedModel, "add"), {**form, "aliases": "\n other \n\n"})

    assert refused.status_code == 200
    assert "korean-qwen" in str(refused.context["adminform"].form.errors["aliases"])
    assert accepted.status_code == 302
    model = ServedModel.objects.get(name="other-model")
    assert model.upstream_url == "http://gpu-2:8000" and model.aliases == ["other"]
