"""The operator console (/console/): staff only; its range figures equal the ledger, link to the
admin's filtered lists and cost the same number of queries for one user or many."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone, translation

from gateway.models import ServedModel
from quotas.models import LedgerDeadLetter
from telemetry import rollups
from telemetry.console import console_figures, range_bounds
from tests.api.conftest import Person, make_person
from tests.api.test_client_api import ledger_row
from tests.portal.conftest import logged_in, text

pytestmark = pytest.mark.django_db
SEOUL = ZoneInfo("Asia/Seoul")
MODEL = "Qwen/Qwen2.5-7B-Instruct"


@pytest.fixture(autouse=True)
def embedded(settings: Any) -> None:
    settings.REDIS_URL = ""  # the ledger backlog is read only where a test asks for it


# --- Access -------------------------------------------------------------------------------------


def test_anonymous_visitors_are_sent_to_the_login(client: Client) -> None:
    response = client.get("/console/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/console/"


def test_a_user_who_is_not_staff_is_refused(alice: Person) -> None:
    assert logged_in(alice).get("/console/").status_code == 403


def test_staff_get_the_page_with_its_live_hooks(staff: Person) -> None:
    with translation.override("en"):
        response = logged_in(staff, language="en").get("/console/")
    assert response.status_code == 200
    page = text(response)
    for metric in (
        "requests_per_second",
        "tokens_per_second",
        "rate_limited_per_second",
        "errors_per_second",
        "in_flight",
    ):
        assert f'data-metric="{metric}"' in page
    assert 'id="console-connection"' in page and 'data-state="closed"' in page
    assert 'id="console-upstreams"' in page and 'id="console-overload"' in page
    assert "portal/vendor/chartjs/chart.umd.min.js" in page and "portal/console.js" in page
    assert 'id="console-config" type="application/json"' in page
    assert "Operator console" in page and "Disconnected: reconnecting" in page


def test_no_inline_script(staff: Person) -> None:
    page = text(logged_in(staff).get("/console/"))
    scripts = re.findall(r"<script\b([^>]*)>", page)
    assert scripts
    for attributes in scripts:
        assert "src=" in attributes or 'type="application/json"' in attributes, attributes


def test_the_page_is_korean_by_default(staff: Person) -> None:
    page = text(logged_in(staff).get("/console/"))
    assert '<html lang="ko">' in page
    assert 'data-locale="ko"' in page


# --- Ranges -------------------------------------------------------------------------------------


def test_ranges_start_at_seoul_midnight() -> None:
    now = datetime(2026, 3, 10, 0, 30, tzinfo=SEOUL)  # 2026-03-09 15:30 UTC
    assert range_bounds("today", now) == (datetime(2026, 3, 10, tzinfo=SEOUL), now)
    assert range_bounds("7d", now)[0] == datetime(2026, 3, 4, tzinfo=SEOUL)
    assert range_bounds("30d", now)[0] == datetime(2026, 2, 9, tzinfo=SEOUL)


def seoul_today() -> datetime:
    return timezone.localtime(timezone.now(), SEOUL).replace(
        hour=0, minute=0, second=0, microsecond=0
    )


def usage(alice: Person, bob: Person) -> None:
    """Alice: 3 successes today (45 tokens) and a 429; Bob: 1 big success today, 1 error; both
    have older rows 3 days ago, only in "7d"."""
    now = timezone.now()
    since_midnight = max((now - seoul_today()) / 2, timedelta(seconds=1))
    today = now - since_midnight
    for _ in range(3):
        ledger_row(alice, started_at=today)
    ledger_row(alice, started_at=today, status_code=429, error_type="tokens_per_minute",
               prompt_tokens=0, completion_tokens=0)  # fmt: skip
    ledger_row(bob, started_at=today, prompt_tokens=100, completion_tokens=50, model="small")
    ledger_row(bob, started_at=today, status_code=502, error_type="upstream_error",
               prompt_tokens=0, completion_tokens=0, model="small")  # fmt: skip
    three_days_ago = now - timedelta(days=3)
    ledger_row(alice, started_at=three_days_ago, prompt_tokens=1000, completion_tokens=1000)


@pytest.mark.parametrize("rolled_up", [False, True])
def test_today_and_seven_days_equal_the_ledger(
    alice: Person, bob: Person, staff: Person, rolled_up: bool
) -> None:
    usage(alice, bob)
    if rolled_up:
        rollups.roll_up_recent()
    today = console_figures("today", "tokens")
    assert [(u.username, u.total_tokens, u.requests) for u in today.users] == [
        ("bob", 150, 2),
        ("앨리스", 45, 4),
    ]
    assert [(name, t.total_tokens) for name, t in today.models] == [("small", 150), (MODEL, 45)]
    assert today.totals.requests == 6 and today.totals.total_tokens == 195
    assert [(k.prefix, k.username, k.total_tokens) for k in today.keys] == [
        (bob.key.prefix, "bob", 150),
        (alice.key.prefix, "앨리스", 45),
    ]
    assert today.errors == [("upstream_error", 1)]
    assert today.refusals == [("tokens_per_minute", 1)]

    week = console_figures("7d", "tokens")
    assert [(u.username, u.total_tokens) for u in week.users] == [("앨리스", 2045), ("bob", 150)]
    by_429 = console_figures("7d", "rate_limited")
    assert [u.username for u in by_429.users] == ["앨리스"]  # bob was never refused
    assert [k.prefix for k in by_429.keys] == [alice.key.prefix]
    by_requests = console_figures("today", "requests")
    assert [u.username for u in by_requests.users] == ["앨리스", "bob"]


def test_the_page_shows_the_figures_with_links_to_the_filtered_ledger(
    alice: Person, bob: Person, staff: Person
) -> None:
    usage(alice, bob)
    page = text(logged_in(staff).get("/console/?range=7d&by=tokens"))
    start = range_bounds("7d")[0]
    since = "started_at__gte=" + start.isoformat(sep=" ").replace(" ", "+").replace(":", "%3A")
    since = since.replace("+09%3A00", "%2B09%3A00")
    user_link = f"/admin/quotas/usagerecord/?user__id__exact={alice.user.pk}&amp;{since}"
    assert user_link in page
    assert f"/admin/quotas/usagerecord/?api_key__id__exact={bob.key.pk}&amp;{since}" in page
    assert f"/admin/quotas/usagerecord/?model=small&amp;{since}" in page
    assert "error_type__exact=upstream_error&amp;status_code__gte=400" in page
    assert "error_type__exact=tokens_per_minute&amp;status_code__exact=429" in page
    assert '<a href="?range=7d&amp;by=tokens" data-range="7d" aria-current="page">' in page
    assert '<div class="value" data-total="tokens">2,195</div>' in page
    # Alice (2,045 tokens) ranks above Bob in 7 days.
    assert page.index(f'data-user-id="{alice.user.pk}"') < page.index(
        f'data-user-id="{bob.user.pk}"'
    )


def test_an_unknown_range_or_order_falls_back_to_today_by_tokens(staff: Person) -> None:
    page = text(logged_in(staff).get("/console/?range=1y&by=%27%3B"))
    assert '<a href="?range=today&amp;by=tokens" data-range="today" aria-current="page">' in page


def test_the_admin_links_open_filtered_lists(alice: Person, bob: Person, staff: Person) -> None:
    usage(alice, bob)
    staff.user.is_superuser = True
    staff.user.save()
    client = logged_in(staff)
    page = text(client.get("/console/?range=7d"))
    links = set(re.findall(r'href="(/admin/quotas/[^"]+\?[^"]+)"', page))
    assert len(links) >= 6
    for link in links:
        response = client.get(link.replace("&amp;", "&"))
        # An admin that refuses a lookup redirects to ?e=1 instead of filtering.
        assert response.status_code == 200, link
    response = client.get(f"/admin/quotas/usagerecord/?user__id__exact={bob.user.pk}")
    assert response.context["cl"].result_count == 2


# --- The ledger's health ------------------------------------------------------------------------


def test_backlog_is_not_applicable_without_redis(staff: Person) -> None:
    page = text(logged_in(staff, language="en").get("/console/"))
    assert re.search(r'data-ledger="backlog"><span class="muted"[^>]*>n/a</span>', page)


def test_backlog_counts_the_redis_stream(staff: Person, settings: Any) -> None:
    url = "redis://127.0.0.1:6379/15"
    settings.REDIS_URL = url
    settings.LEDGER_STREAM = "test-console:ledger"
    connection = redis.Redis.from_url(url)
    connection.delete(settings.LEDGER_STREAM)
    try:
        for n in range(3):
            connection.xadd(settings.LEDGER_STREAM, {"row": str(n)})
        page = text(logged_in(staff).get("/console/"))
        assert re.search(r'data-ledger="backlog"><span class="badge warn">3</span>', page)
        assert console_figures("today", "tokens").backlog == 3
    finally:
        connection.delete(settings.LEDGER_STREAM)
        connection.close()


def test_backlog_is_unknown_when_redis_does_not_answer(settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    assert console_figures("today", "tokens").backlog is None


def test_dead_letters_not_yet_replayed_are_counted_and_linked(staff: Person) -> None:
    for n in range(2):
        LedgerDeadLetter.objects.create(source="stream", request_id=f"r{n}", raw="{}", error="x")
    LedgerDeadLetter.objects.create(
        source="stream", request_id="done", raw="{}", error="x", replayed_at=timezone.now()
    )
    page = text(logged_in(staff).get("/console/"))
    assert (
        '<a href="/admin/quotas/ledgerdeadletter/?replayed_at__isnull=True">'
        '<span class="badge bad">2</span></a>'
    ) in page


def test_reconciliation_per_model_over_the_range(alice: Person, staff: Person) -> None:
    ServedModel.objects.create(name=MODEL)
    ServedModel.objects.create(name="unused")
    now = timezone.now()
    for estimated in (10, 10, 13, 16):  # billed 10 each: two differ, by 3 and 6
        ledger_row(alice, started_at=now - timedelta(seconds=5), usage_source="upstream",
                   estimated_prompt_tokens=estimated)  # fmt: skip
    ledger_row(
        alice,
        started_at=now - timedelta(days=3),
        usage_source="upstream",
        estimated_prompt_tokens=99,
    )  # fmt: skip  (only in 7 days)
    today = {r.model: r for r in console_figures("today", "tokens").reconciliation}
    assert (today[MODEL].checked, today[MODEL].differing, today[MODEL].mean_gap) == (4, 2, 4.5)
    assert today["unused"].checked == 0
    week = {r.model: r for r in console_figures("7d", "tokens").reconciliation}
    assert (week[MODEL].checked, week[MODEL].differing) == (5, 3)
    page = text(logged_in(staff).get("/console/"))
    assert '<span class="badge warn">2 (50.0 %)</span>' in page


# --- Cost ---------------------------------------------------------------------------------------


def test_query_count_is_the_same_for_one_user_and_many(
    alice: Person, staff: Person, django_assert_num_queries: Any
) -> None:
    ServedModel.objects.create(name=MODEL)
    ledger_row(alice)
    client = logged_in(staff)
    # session, user, 8 for the figures (telemetry.console)
    with django_assert_num_queries(10):
        assert client.get("/console/?range=30d").status_code == 200
    for n in range(12):
        person = make_person(f"user{n}")
        ledger_row(person, model=f"model-{n}", status_code=500 + n % 3, error_type=f"e{n}")
        ledger_row(person, model=f"model-{n}", status_code=429, error_type=f"limit{n % 4}")
        ServedModel.objects.create(name=f"model-{n}")
    rollups.roll_up_recent()
    ledger_row(alice)  # and a not rolled-up tail
    with django_assert_num_queries(10):
        page = text(client.get("/console/?range=30d"))
    assert page.count("data-user-id=") == 10  # the top ten of 13
    assert page.count("data-error-type=") == 12


def test_the_feed_is_rechecked_every_30_seconds_by_default() -> None:
    from telemetry.consumers import recheck_seconds

    assert django_settings.STATS_RECHECK_SECONDS == 30.0 == recheck_seconds()
