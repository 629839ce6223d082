"""The ledger's admin list: the columns an operator scans, readable numbers, the refusing limit
in words, loose search resolved to index lookups, and a constant number of queries."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from accounts.models import ApiKey
from accounts.services import create_api_key
from gateway.models import ServedModel
from quotas.models import UsageRecord

pytestmark = pytest.mark.django_db

LIST = "/admin/quotas/usagerecord/"
AT = datetime(2026, 3, 1, 3, 4, 5, tzinfo=UTC)  # 12:04:05 in Seoul
MODEL = "Qwen/Qwen2.5-7B-Instruct"
EN = {"accept-language": "en"}
# session, user, the served models (the model filter), the count or the planner's estimate,
# the page (keys and users joined); a search resolves users first instead of estimating.
LEDGER_LIST_QUERIES = 6
LEDGER_SEARCH_QUERIES = 6
LEDGER_DETAIL_QUERIES = 3  # session, user, the row with its user and key


@pytest.fixture
def key() -> ApiKey:
    user = User.objects.create_user("원장사용자")
    return create_api_key(user, actor=None, name="노트북")[0]


def row(key: ApiKey, n: int, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": f"chatcmpl-{n:032x}",
        "user": key.user,
        "api_key": key,
        "model": MODEL,
        "endpoint": "chat/completions",
        "prompt_tokens": 12_345,
        "completion_tokens": 1_000,
        "cached_tokens": 2_048,
        "status_code": 200,
        "started_at": AT - timedelta(seconds=n),
        "finished_at": AT - timedelta(seconds=n) + timedelta(seconds=2),
        "upstream_latency_ms": 1258.9435819999153,
        **fields,
    }
    return UsageRecord.objects.create(**values)


def cells(page: str, column: str) -> list[str]:
    """The text of one column's cells, in row order."""
    pattern = rf'<t[dh] class="field-{column}"[^>]*>(.*?)</t[dh]>'
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(pattern, page, re.S)]


def test_the_list_has_the_scanned_columns_and_not_the_request_id(
    admin_client: Client, key: ApiKey
) -> None:
    record = row(key, 0)

    response = admin_client.get(LIST, headers=EN)
    detail = admin_client.get(reverse("admin:quotas_usagerecord_change", args=[record.pk]))
    page = response.content.decode()

    assert list(response.context["cl"].list_display) == [
        "started_shown", "user", "key_prefix", "model_shown", "status_badge", "prompt_shown",
        "completion_shown", "cached_shown", "total_shown", "latency_shown", "refusal",
    ]  # fmt: skip
    assert list(response.context["cl"].list_display_links) == ["started_shown"]
    assert record.request_id not in page
    assert record.request_id in detail.content.decode()
    assert cells(page, "started_shown") == ["2026-03-01 12:04:05"]
    assert cells(page, "key_prefix") == [f"{key.prefix}…"]
    assert cells(page, "prompt_shown") == ["12,345"]
    assert cells(page, "completion_shown") == ["1,000"]
    assert cells(page, "cached_shown") == ["2,048"]
    assert cells(page, "total_shown") == ["13,345"]
    assert cells(page, "latency_shown") == ["1,258.9 ms"]
    assert "1258.94" not in page


@pytest.mark.parametrize(
    ("status", "error_type", "badge", "refusal"),
    [
        (200, "", "badge-ok", "-"),
        (429, "requests", "badge-warn", "requests per minute"),
        (429, "tokens", "badge-warn", "tokens per minute"),
        (429, "tokens_per_hour", "badge-warn", "tokens per hour"),
        (429, "tokens_per_day", "badge-warn", "daily token quota"),
        (429, "parallel_requests", "badge-warn", "too many at once"),
        (429, "cooldown", "badge-warn", "cooldown"),
        (502, "upstream_error", "badge-bad", "-"),
    ],
)
def test_status_is_a_badge_and_a_refusal_names_its_limit(
    admin_client: Client, key: ApiKey, status: int, error_type: str, badge: str, refusal: str
) -> None:
    row(key, 0, status_code=status, error_type=error_type, upstream_latency_ms=None)

    page = admin_client.get(LIST, headers=EN).content.decode()

    [status_cell] = re.findall(r'<td class="field-status_badge">(.*?)</td>', page, re.S)
    assert f'class="badge {badge}"' in status_cell
    assert cells(page, "refusal") == [refusal]
    assert cells(page, "latency_shown") == ["-"]


def test_search_by_partial_username_key_prefix_and_request_id(
    admin_client: Client, key: ApiKey
) -> None:
    other = create_api_key(User.objects.create_user("다른사람"), actor=None)[0]
    mine = [row(key, n) for n in range(3)]
    theirs = row(other, 10)

    def found(term: str) -> set[int]:
        return {r.pk for r in admin_client.get(LIST, {"q": term}).context["cl"].result_list}

    assert found("원장") == {r.pk for r in mine}  # part of the username
    assert found("사용자") == {r.pk for r in mine}
    assert found(key.prefix) == {r.pk for r in mine}
    assert found(f"{key.prefix}…") == {r.pk for r in mine}  # as the list shows it
    assert found(key.prefix[:8]) >= {r.pk for r in mine}
    assert found(theirs.request_id) == {theirs.pk}
    assert found(theirs.request_id[:20]) == set()  # request ids: exact only
    assert found("아무도아님") == set()


def test_filters_by_status_model_and_date(admin_client: Client, key: ApiKey) -> None:
    ServedModel.objects.create(name=MODEL)
    ok = row(key, 0)
    limited = row(key, 1, status_code=429, error_type="tokens")
    other_model = row(key, 2, model="other")
    old = row(key, 3, started_at=datetime(2020, 1, 1, tzinfo=UTC))

    def found(**query: str) -> set[int]:
        return {r.pk for r in admin_client.get(LIST, query).context["cl"].result_list}

    assert found(status="429") == {limited.pk}
    assert found(model=MODEL) == {ok.pk, limited.pk, old.pk}
    assert other_model.pk not in found(model=MODEL)
    assert found(started_at__gte="2026-01-01 00:00:00+09:00") == {
        ok.pk,
        limited.pk,
        other_model.pk,
    }
    assert old.pk in found()


@pytest.mark.parametrize("rows", [1, 30])
def test_the_list_costs_the_same_queries_for_1_and_30_rows(
    admin_client: Client,
    key: ApiKey,
    rows: int,
    django_assert_num_queries: Callable[..., Any],
) -> None:
    other = create_api_key(User.objects.create_user("둘째"), actor=None)[0]
    for n in range(rows):
        row(key if n % 2 else other, n)

    with django_assert_num_queries(LEDGER_LIST_QUERIES):
        response = admin_client.get(LIST)

    assert len(response.context["cl"].result_list) == rows


def test_a_search_costs_the_same_queries_for_1_and_30_rows(
    admin_client: Client, key: ApiKey, django_assert_num_queries: Callable[..., Any]
) -> None:
    row(key, 0)
    with django_assert_num_queries(LEDGER_SEARCH_QUERIES):
        one = admin_client.get(LIST, {"q": "원장"})
    for n in range(1, 30):
        row(key, n)
    with django_assert_num_queries(LEDGER_SEARCH_QUERIES):
        thirty = admin_client.get(LIST, {"q": "원장"})

    assert len(one.context["cl"].result_list) == 1
    assert len(thirty.context["cl"].result_list) == 30


def test_a_record_page_costs_a_fixed_number_of_queries(
    admin_client: Client, key: ApiKey, django_assert_num_queries: Callable[..., Any]
) -> None:
    record = row(key, 0, status_code=429, error_type="tokens_per_day")
    warm = row(key, 1)
    # Django's content-type cache, filled once a process.
    admin_client.get(reverse("admin:quotas_usagerecord_change", args=[warm.pk]))

    with django_assert_num_queries(LEDGER_DETAIL_QUERIES):
        response = admin_client.get(
            reverse("admin:quotas_usagerecord_change", args=[record.pk]), headers=EN
        )

    page = response.content.decode()
    assert "daily token quota" in page and "1,258.9 ms" in page
