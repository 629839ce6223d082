"""내 사용량, 요청 기록, 한도 안내: what a user sees is theirs, equals the ledger and the limiter,
and costs a fixed number of queries."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone, translation

from api import me as me_module
from quotas.models import Plan, UsageRecord
from tests.api.conftest import Person
from tests.api.test_client_api import _admit, ledger_row
from tests.portal.conftest import logged_in, text
from tokenlimit.limiter import LimiterUnavailable

pytestmark = pytest.mark.django_db

PAGES = ("/", "/requests/", "/limits/", "/keys/", "/usage.csv")


@pytest.mark.parametrize("path", PAGES)
def test_every_page_needs_a_login(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


def test_login_page_is_korean_by_default_and_english_on_request(client: Client) -> None:
    page = text(client.get("/accounts/login/"))
    assert '<html lang="ko">' in page
    assert "로그인" in page
    client.post("/i18n/setlang/", {"language": "en", "next": "/accounts/login/"})
    page = text(client.get("/accounts/login/"))
    assert '<html lang="en">' in page
    assert "Log in" in page


def test_a_user_logs_in_with_a_password_and_lands_on_their_usage(alice: Person) -> None:
    alice.user.set_password("a-long-passphrase-for-tests")
    alice.user.save()
    client = Client(enforce_csrf_checks=True)
    page = client.get("/accounts/login/?next=/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', text(page))
    assert token
    response = client.post(
        "/accounts/login/",
        {
            "username": "앨리스",
            "password": "a-long-passphrase-for-tests",
            "next": "/",
            "csrfmiddlewaretoken": token.group(1),
        },
    )
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.get("/").status_code == 200


def _figure(page: str, summary: str, figure: str) -> int:
    block = page.split(f'data-summary="{summary}"', 1)[1]
    found = re.search(rf'data-figure="{figure}">(?:<strong>)?([\d,]+)', block)
    assert found, (summary, figure)
    return int(found.group(1).replace(",", ""))


def test_today_equals_the_ledger_and_another_users_rows_never_count(
    alice: Person, bob: Person
) -> None:
    now = timezone.now()
    ledger_row(alice, prompt_tokens=1200, completion_tokens=34, cached_tokens=1000)
    ledger_row(alice, prompt_tokens=5, completion_tokens=0, status_code=429, error_type="tokens")
    ledger_row(bob, prompt_tokens=777_777, completion_tokens=1)
    # Yesterday (KST) counts for the month (when it is this month), never for today.
    yesterday = timezone.localtime(now).replace(hour=12) - timedelta(days=1)
    ledger_row(alice, prompt_tokens=70, completion_tokens=7, started_at=yesterday)
    page = text(logged_in(alice).get("/"))
    assert _figure(page, "today", "total_tokens") == 1200 + 34 + 5
    assert _figure(page, "today", "prompt_tokens") == 1205
    assert _figure(page, "today", "cached_tokens") == 1000
    assert _figure(page, "today", "requests") == 2
    assert _figure(page, "today", "rate_limited") == 1
    same_month = yesterday.month == timezone.localtime(now).month
    assert _figure(page, "month", "total_tokens") == 1239 + (77 if same_month else 0)
    assert "1,239" in page  # thousands separators
    assert "777,778" not in page and "777,777" not in page
    # Per key: alice's key, once.
    assert page.count(f"<code>{alice.key.prefix}…</code>") == 1


def test_the_live_windows_show_what_the_limiter_holds(alice: Person, bob: Person) -> None:
    _admit(alice, 300)
    _admit(alice, 200)
    _admit(bob, 999)
    page = text(logged_in(alice).get("/"))
    tpm = page.split('data-window="tokens_per_minute"', 1)[1]
    assert re.search(r"data-used>500<", tpm)
    plan = Plan.objects.get(name="default")
    assert f"data-limit>{plan.tokens_per_minute:,}<" in tpm
    rpm = page.split('data-window="requests_per_minute"', 1)[1]
    assert re.search(r"data-used>2<", rpm)
    day = page.split('data-window="tokens_per_day"', 1)[1].split('data-window="parallel"')[0]
    assert "00:00" in day  # the daily reset is midnight, KST


def test_the_page_still_answers_when_the_limiter_cannot_be_read(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(scopes: Any) -> Any:
        raise LimiterUnavailable("redis down")

    monkeypatch.setattr(me_module, "read_live_state", down)
    with translation.override("en"):
        response = logged_in(alice, language="en").get("/")
    assert response.status_code == 200
    assert "cannot be read right now" in text(response)


def test_usage_page_query_count_does_not_grow_with_rows(
    alice: Person, django_assert_num_queries: Any
) -> None:
    client = logged_in(alice)
    client.get("/")

    # Session, user; day report (watermark + union), hour report (the same), per key;
    # /me: limits (quota with its plan), keys with limits of their own.
    with django_assert_num_queries(9):
        assert client.get("/").status_code == 200
    for minutes in range(1, 40):
        ledger_row(alice, started_at=timezone.now() - timedelta(minutes=minutes))
    with django_assert_num_queries(9):
        assert client.get("/").status_code == 200


def test_csv_download_by_day_and_by_hour(alice: Person, bob: Person) -> None:
    ledger_row(alice, prompt_tokens=11, completion_tokens=4)
    ledger_row(bob, prompt_tokens=500, completion_tokens=5)
    client = logged_in(alice)
    for period in ("day", "hour"):
        response = client.get(f"/usage.csv?period={period}")
        assert response["Content-Type"] == "text/csv; charset=utf-8"
        body = response.content.decode("utf-8")
        assert body.startswith("\ufeff")
        rows = list(csv.reader(io.StringIO(body.removeprefix("\ufeff"))))
        assert rows[0][:3] == ["period", "start", "requests"]
        assert [(row[0], row[6]) for row in rows[1:]] == [(period, "15")]


# --- 요청 기록 ------------------------------------------------------------------------------------


def test_request_history_shows_only_own_rows_and_explains_refusals(
    alice: Person, bob: Person
) -> None:
    ok = ledger_row(alice, time_to_first_token_ms=123.456)
    refused = ledger_row(
        alice, status_code=429, error_type="tokens_per_day", prompt_tokens=0, completion_tokens=0
    )
    theirs = ledger_row(bob)
    with translation.override("en"):
        page = text(logged_in(alice, language="en").get("/requests/"))
    assert ok.request_id in page and refused.request_id in page
    assert theirs.request_id not in page
    row = page.split(f'data-request-id="{refused.request_id}"', 1)[1].split("</tr>", 1)[0]
    assert "Daily token quota used up" in row
    assert "From midnight (KST)" in row
    assert "1,500.0 ms" in page
    assert "first token 123.5 ms" in page


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("requests", "Within a minute"),
        ("tokens", "Within a minute"),
        ("tokens_per_hour", "Within the hour"),
        ("parallel_requests", "As soon as one of your running requests ends"),
        ("cooldown", "After the cooldown"),
    ],
)
def test_each_refusal_says_when_to_retry(alice: Person, kind: str, words: str) -> None:
    ledger_row(alice, status_code=429, error_type=kind)
    with translation.override("en"):
        page = text(logged_in(alice, language="en").get("/requests/?status=rate_limited"))
    assert words in page


def test_request_history_filters_and_pages(alice: Person) -> None:
    rows = [ledger_row(alice) for _ in range(55)]
    failed = ledger_row(alice, status_code=502, error_type="upstream_error")
    client = logged_in(alice)
    first = text(client.get("/requests/"))
    assert first.count("data-request-id=") == 50
    older = re.search(r'before=(\d+)"', first)
    assert older
    second = text(client.get(f"/requests/?before={older.group(1)}"))
    assert second.count("data-request-id=") == 6
    assert rows[0].request_id in second
    errors = text(client.get("/requests/?status=error"))
    assert errors.count("data-request-id=") == 1 and failed.request_id in errors
    # Nonsense is ignored, never an error page.
    assert client.get("/requests/?before=abc&status=<x>").status_code == 200


def test_request_history_query_count_does_not_grow_with_rows(
    alice: Person, django_assert_num_queries: Any
) -> None:
    client = logged_in(alice)
    ledger_row(alice, status_code=429, error_type="tokens")
    client.get("/requests/")
    # Session, user, the rows with their keys, the limits (quota with its plan) for the cooldown.
    with django_assert_num_queries(4):
        client.get("/requests/")
    for _ in range(30):
        ledger_row(alice, status_code=429, error_type="requests")
    with django_assert_num_queries(4):
        assert text(client.get("/requests/")).count("data-request-id=") == 31


# --- 한도 안내 ------------------------------------------------------------------------------------


def test_limits_page_gives_the_users_own_numbers(alice: Person, bob: Person) -> None:
    from quotas.services import default_plan, set_user_quota

    set_user_quota(alice.user, default_plan(), actor=None, tokens_per_day=1_234_567)
    page = text(logged_in(alice).get("/limits/"))
    day = page.split('data-limit="tokens_per_day"', 1)[1].split("</tr>", 1)[0]
    assert "1,234,567" in day
    assert "00:00" in day
    other = text(logged_in(bob).get("/limits/"))
    assert "1,234,567" not in other


def test_staff_see_the_console_and_admin_links_others_do_not(alice: Person, staff: Person) -> None:
    assert "/console/" not in text(logged_in(alice).get("/limits/"))
    page = text(logged_in(staff).get("/limits/"))
    assert 'href="/console/"' in page and 'href="/admin/"' in page


def test_usage_record_rows_are_untouched_by_viewing(alice: Person) -> None:
    ledger_row(alice)
    before = list(UsageRecord.objects.values_list("pk", "prompt_tokens"))
    logged_in(alice).get("/")
    assert list(UsageRecord.objects.values_list("pk", "prompt_tokens")) == before
