"""The staff console in a real browser: its live numbers move while traffic runs through the
gateway (the websocket feed, published once a second by the gateway process), and a non-staff
user is kept out. Screenshots under var/screenshots/."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import LiveSite, OpenPage, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DEADLINE = 20.0


def log_in(page: Page, site: LiveSite, username: str, password: str) -> None:
    page.goto(f"{site.url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("#login-submit")
    page.wait_for_url(f"{site.url}/")


def metric(page: Page, name: str) -> float:
    text = page.locator(f'[data-metric="{name}"]').first.inner_text()
    digits = "".join(ch for ch in text if ch.isdigit() or ch == ".")
    return float(digits or 0)


def test_the_console_shows_live_numbers_moving_with_traffic(
    open_page: OpenPage, live_site: LiveSite
) -> None:
    from openai import OpenAI

    page, _ = open_page("ko")
    log_in(page, live_site, live_site.staff_username, live_site.staff_password)
    page.goto(f"{live_site.url}/console/")
    page.locator('#console-connection[data-state="open"]').wait_for()

    stop = threading.Event()
    sent = [0]

    def traffic() -> None:
        client = OpenAI(base_url=live_site.v1, api_key=live_site.client_key, max_retries=0)
        while not stop.is_set():
            client.chat.completions.create(
                model=live_site.model,
                messages=[{"role": "user", "content": "콘솔 테스트입니다."}],
                max_tokens=8,
            )
            sent[0] += 1
            time.sleep(0.05)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + DEADLINE
        while metric(page, "requests_per_second") <= 0 or metric(page, "tokens_per_second") <= 0:
            assert worker.is_alive(), "the traffic thread died"
            assert time.monotonic() < deadline, "the console's numbers never moved"
            page.wait_for_timeout(250)
        screenshot(page, "console-live")
    finally:
        stop.set()
        worker.join(timeout=10)
    assert sent[0] > 0
    # Traffic stopped: requests/s falls back to zero within a few published seconds.
    deadline = time.monotonic() + DEADLINE
    while metric(page, "requests_per_second") > 0:
        assert time.monotonic() < deadline, "requests/s never went back to zero"
        page.wait_for_timeout(250)


def test_a_client_is_kept_out_of_the_console(open_page: OpenPage, live_site: LiveSite) -> None:
    page, _ = open_page("ko")
    log_in(page, live_site, live_site.client_username, live_site.client_password)
    assert page.locator('a[href="/console/"]').count() == 0
    response = page.goto(f"{live_site.url}/console/")
    assert response is not None and response.status == 403
