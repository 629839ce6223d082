"""The admin as an operator uses it, in a real browser: the ledger list fits a 1280 px screen
and finds a user by part of the name; a user's page shows their keys and usage; a key added
with its own limit is shown once with a copy button; revoking asks first. Screenshots under
var/screenshots/."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import LiveSite, OpenPage, screenshot
from tests.browser.test_docs_and_admin import assert_styled, log_in

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

WIDTH = 1280


def fits_the_screen(page: Page) -> None:
    overflow = page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= WIDTH, f"the page is {overflow} px wide at {WIDTH} px"


def test_the_ledger_fits_and_finds_a_user_by_part_of_the_name(
    open_page: OpenPage, live_site: LiveSite
) -> None:
    page, _ = open_page("ko")
    log_in(page, live_site)
    part = live_site.client_username[:3]
    page.goto(f"{live_site.url}/admin/quotas/usagerecord/?q={part}")
    assert_styled(page)
    rows = page.locator("#result_list tbody tr")
    rows.first.wait_for()
    assert rows.count() >= 1
    for index in range(rows.count()):
        assert live_site.client_username in rows.nth(index).inner_text()
    assert rows.first.locator("td.field-status_badge .badge").count() == 1
    fits_the_screen(page)
    screenshot(page, "admin-ledger-search")


def test_an_operator_adds_a_key_sees_it_once_and_revokes_it(
    open_page: OpenPage, live_site: LiveSite
) -> None:
    page, _ = open_page("ko")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    log_in(page, live_site)

    # The user's page: keys, plan and usage.
    page.goto(f"{live_site.url}/admin/auth/user/?q={live_site.client_username}")
    page.locator("#result_list tbody tr th a").first.click()
    for section in ("#user-keys", "#user-plan", "#user-usage"):
        page.locator(section).wait_for()
    screenshot(page, "admin-user")

    # A key with a limit of its own, for that user (the autocomplete widget).
    page.goto(f"{live_site.url}/admin/accounts/apikey/add/")
    page.locator(".field-user .select2-selection").click()
    page.locator(".select2-search__field").fill(live_site.client_username)
    page.locator(".select2-results__option", has_text=live_site.client_username).first.click()
    page.fill("#id_name", "운영자가 만든 키")
    page.fill("#id_tokens_per_minute", "500")
    screenshot(page, "admin-key-add")
    page.locator("input[name=_save]").click()
    box = page.locator("#new-key-box")
    box.wait_for()
    raw = page.locator("#new-key-value").inner_text().strip()
    assert raw.startswith("sk-")
    page.click("#copy-new-key")
    assert page.evaluate("navigator.clipboard.readText()") == raw
    screenshot(page, "admin-key-new")
    # Shown once: a reload finds it gone.
    page.reload()
    page.locator("#new-key-gone").wait_for()
    assert raw not in page.content()

    # Its page, then revoke after the confirmation page.
    page.click("#to-key-page")
    page.locator("#revoke-key").wait_for()
    assert page.input_value("#id_tokens_per_minute") == "500"
    screenshot(page, "admin-key")
    page.click("#revoke-key")
    page.locator("#confirm-revoke").wait_for()
    assert raw[:11] in page.locator("#revoke-keys").inner_text()
    screenshot(page, "admin-key-revoke-confirmation")
    page.click("#confirm-revoke")
    page.wait_for_load_state()
    assert page.locator("#revoke-key").count() == 0  # revoked: no button any more
    assert page.locator(".badge", has_text="폐기").count() >= 1


def test_an_operator_runs_the_tokenizer_self_check_from_the_model_list(
    open_page: OpenPage, live_site: LiveSite
) -> None:
    """The action probes the model's upstream (the simulator) from the admin's process and
    the list then shows the outcome; the model's page has the history and the upstream kind."""
    page, _ = open_page("ko")
    log_in(page, live_site)
    page.goto(f"{live_site.url}/admin/gateway/servedmodel/")
    assert_styled(page)
    page.locator("#result_list tbody input.action-select").first.check()
    page.select_option("select[name=action]", "run_self_check")
    page.locator("button[name=index]").click()
    page.locator("ul.messagelist li").first.wait_for()
    assert "probes equal" in page.locator("ul.messagelist").inner_text()
    assert "upstream과 같음" in page.locator("#result_list td.field-self_check").first.inner_text()
    fits_the_screen(page)
    screenshot(page, "admin-models")

    page.locator("#result_list th.field-name a").first.click()
    page.locator("#tokenizer_checks-group").wait_for()
    assert "upstream과 같음" in page.locator("#tokenizer_checks-group").inner_text()
    assert page.locator("select[name=upstream_kind]").input_value() == "auto"
    screenshot(page, "admin-model")
