"""The end user's portal in a real browser: log in, see today's usage equal to the ledger, create
a key (shown once, copied from the dialog), use it with the official `openai` SDK, revoke it
and see the next call refused; every portal page saved as a screenshot; Korean by default,
English by the switch.

The browser, the gateway, the Celery worker that writes the ledger and the SGLang simulator
are real processes (conftest.live_site). Database reads from this process run in a thread:
while Playwright's sync API lives, Django refuses queries from the main thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from tests.browser.conftest import LiveSite, OpenPage, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

T = TypeVar("T")
DEADLINE = 20.0  # seconds for the ledger (worker, roll-ups) to show a request


def in_thread(blocker: Any, work: Callable[[], T]) -> T:
    def run() -> T:
        from django.db import connection

        with blocker.unblock():
            try:
                return work()
            finally:
                connection.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def ledger_total_today(username: str) -> tuple[int, int]:
    """(total tokens, requests) of the user's ledger rows since midnight in Seoul."""
    from django.db.models import Count, Sum
    from django.utils import timezone

    from quotas.models import UsageRecord

    midnight = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    sums = UsageRecord.objects.filter(user__username=username, started_at__gte=midnight).aggregate(
        p=Sum("prompt_tokens"), c=Sum("completion_tokens"), n=Count("pk")
    )
    return (sums["p"] or 0) + (sums["c"] or 0), sums["n"]


def log_in(page: Page, site: LiveSite) -> None:
    page.goto(f"{site.url}/")
    assert page.url.startswith(f"{site.url}/accounts/login/")  # sent to the login page
    page.fill("#id_username", site.client_username)
    page.fill("#id_password", site.client_password)
    page.click("#login-submit")
    page.wait_for_url(f"{site.url}/")


def today_figure(page: Page, figure: str) -> int:
    text = page.locator(f'[data-summary="today"] [data-figure="{figure}"]').inner_text()
    return int(text.replace(",", "").strip())


def wait_for_today(page: Page, site: LiveSite, blocker: Any, requests: int) -> int:
    """Reload "/" until the ledger has `requests` rows today and the page shows their sum."""
    deadline = time.monotonic() + DEADLINE
    while True:
        total, count = in_thread(blocker, lambda: ledger_total_today(site.client_username))
        page.goto(f"{site.url}/")
        shown = today_figure(page, "total_tokens")
        if count >= requests and shown == total:
            return total
        if time.monotonic() > deadline:
            raise AssertionError(f"page shows {shown}, ledger {total} in {count} rows")
        time.sleep(0.3)


def test_an_end_user_sees_usage_creates_uses_and_revokes_a_key(
    open_page: OpenPage, live_site: LiveSite, django_db_blocker: Any
) -> None:
    from openai import AuthenticationError, OpenAI

    page, _ = open_page("ko")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    response = page.goto(f"{live_site.url}/accounts/login/")
    assert response is not None and response.status == 200
    assert page.locator("html").get_attribute("lang") == "ko"
    screenshot(page, "portal-login")
    log_in(page, live_site)

    # Today's usage is the ledger's sum (conftest's row, and whatever came before).
    _, before = in_thread(django_db_blocker, lambda: ledger_total_today(live_site.client_username))
    wait_for_today(page, live_site, django_db_blocker, before)
    screenshot(page, "portal-usage")

    # A new key: shown once in a dialog, copied with the button.
    page.goto(f"{live_site.url}/keys/")
    page.fill("#id_name", "브라우저 테스트")
    page.click("#new-key-form button[type=submit]")
    dialog = page.locator("#new-key-dialog")
    dialog.wait_for(state="visible")
    raw_key = page.locator("[data-new-key]").inner_text().strip()
    assert raw_key.startswith("sk-")
    screenshot(page, "portal-keys-new-key-dialog")
    page.click('[data-copy="new-key-value"]')
    assert page.evaluate("navigator.clipboard.readText()") == raw_key
    page.click("#new-key-dialog [data-close-dialog]")
    assert not dialog.is_visible()

    # The key works with the official SDK, unchanged, and its usage reaches the page.
    client = OpenAI(base_url=live_site.v1, api_key=raw_key, max_retries=0)
    reply = client.chat.completions.create(
        model=live_site.model,
        messages=[{"role": "user", "content": "안녕하세요! 오늘 서울 날씨 어때요?"}],
        max_tokens=16,
    )
    assert reply.usage is not None and reply.usage.total_tokens > 0
    total = wait_for_today(page, live_site, django_db_blocker, before + 1)
    assert total >= reply.usage.total_tokens

    # Its row in the request history.
    page.goto(f"{live_site.url}/requests/")
    first = page.locator("#request-list tbody tr").first
    assert first.get_attribute("data-state") == "ok"
    assert first.locator("td").nth(1).inner_text() == live_site.model
    screenshot(page, "portal-requests")

    # Revoke, after the confirmation dialog; the next call is refused.
    page.goto(f"{live_site.url}/keys/")
    row = page.locator("#key-list tbody tr", has=page.locator(f"code:text-is('{raw_key[:11]}…')"))
    row.locator("[data-open-dialog]").click()
    confirm = row.locator("dialog")
    confirm.wait_for(state="visible")
    screenshot(page, "portal-keys-revoke-confirmation")
    confirm.locator("button[type=submit]").click()
    page.wait_for_url(f"{live_site.url}/keys/")
    assert row.locator('[data-state="revoked"]').count() == 1
    screenshot(page, "portal-keys")
    # Gateways cache a key's lookup for at most 5 s (GATEWAY_KEY_CACHE_SECONDS).
    deadline = time.monotonic() + 10
    while True:
        try:
            client.chat.completions.create(
                model=live_site.model,
                messages=[{"role": "user", "content": "또 안녕"}],
                max_tokens=4,
            )
        except AuthenticationError as refused:
            assert refused.status_code == 401
            break
        assert time.monotonic() < deadline, "the revoked key still works after 10 s"
        time.sleep(0.2)

    page.goto(f"{live_site.url}/limits/")
    assert page.locator("#limit-list").is_visible()
    screenshot(page, "portal-limits")

    # Quota alerts: 80 % of the daily quota, saved and shown.
    page.goto(f"{live_site.url}/alerts/")
    page.check('input[name="day_percents"][value="80"]')
    page.click("#alert-form button[type=submit]")
    page.wait_for_url(f"{live_site.url}/alerts/")
    card = page.locator('[data-alert-window="tokens_per_day"]')
    assert card.locator('tr[data-threshold="80"]').count() == 1
    assert page.locator('input[name="day_percents"][value="80"]').is_checked()
    screenshot(page, "portal-alerts")


def test_korean_by_default_and_english_by_the_switch(
    open_page: OpenPage, live_site: LiveSite
) -> None:
    page, _ = open_page("ko")
    log_in(page, live_site)
    assert page.locator("html").get_attribute("lang") == "ko"
    assert page.locator("h1").first.inner_text() == "내 사용량"
    page.click("button[name=language][value=en]")
    page.wait_for_load_state()
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.locator("h1").first.inner_text() == "My usage"
    screenshot(page, "portal-usage-en")
    page.click("button[name=language][value=ko]")
    page.wait_for_load_state()
    assert page.locator("h1").first.inner_text() == "내 사용량"
