"""What only a browser shows: the API docs working behind a firewall (no request leaves the
server), Swagger UI's "Try it out" with a client key, the admin actually styled, and Korean by
default with English on request.

Each test saves full-page screenshots under var/screenshots/ (see conftest.screenshot).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import LiveSite, OpenPage, Traffic, save_traffic, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ME_PATH = "/api/v1/me"
# Swagger UI's id for an operation: operations-<tag>-<operationId> (docs/openapi.yaml).
ME_OPERATION = "#operations-client-me_retrieve"
ME_SUMMARY = {"ko": "내 한도와 실시간 상태", "en": "My limits and their live state"}


def assert_stayed_home(traffic: Traffic, name: str) -> None:
    """Nothing but the server itself was asked for anything; what the page's CSP stopped in the
    browser never left it, so it is allowed (listed on failure, to tell the two apart, and in
    var/screenshots/<name>.requests.txt every time)."""
    save_traffic(traffic, name)
    assert traffic.requested, "the page made no request at all: the recording is broken"
    assert traffic.external() == [], (
        f"requests for other origins: {traffic.external()} "
        f"(stopped by the CSP: {traffic.blocked_by_csp()})"
    )
    assert all(traffic.is_local(url) for url in traffic.finished)


# --- The API docs ---------------------------------------------------------------------------------


def swagger(page: Page, site: LiveSite) -> None:
    page.goto(f"{site.url}/api/v1/docs")
    # Rendered from the schema it fetched: the operation is there with its path.
    page.locator(f"{ME_OPERATION} .opblock-summary-path").wait_for()
    assert page.locator(f"{ME_OPERATION} .opblock-summary-path").inner_text() == ME_PATH


@pytest.mark.parametrize("language", ["ko", "en"])
def test_swagger_ui_renders_from_our_server_only_in_the_browsers_language(
    open_page: OpenPage, live_site: LiveSite, language: str
) -> None:
    page, traffic = open_page(language)
    swagger(page, live_site)
    summary = page.locator(f"{ME_OPERATION} .opblock-summary-description")
    assert summary.inner_text() == ME_SUMMARY[language]
    # Swagger UI's own stylesheet is applied (it is a static file of ours, not a CDN's).
    border = page.locator(ME_OPERATION).evaluate("el => getComputedStyle(el).borderColor")
    assert border not in ("", "rgb(0, 0, 0)"), border
    screenshot(page, f"swagger-{language}")
    page.wait_for_load_state("networkidle")
    assert_stayed_home(traffic, f"swagger-{language}")


@pytest.mark.parametrize("language", ["ko", "en"])
def test_redoc_renders_from_our_server_only_in_the_browsers_language(
    open_page: OpenPage, live_site: LiveSite, language: str
) -> None:
    page, traffic = open_page(language)
    page.goto(f"{live_site.url}/api/v1/redoc")
    # The menu entry and the operation's heading carry the summary.
    heading = page.locator("h2", has_text=ME_SUMMARY[language])
    heading.wait_for()
    assert heading.is_visible()
    assert page.get_by_text(ME_PATH, exact=True).first.is_visible()
    screenshot(page, f"redoc-{language}")
    page.wait_for_load_state("networkidle")
    assert_stayed_home(traffic, f"redoc-{language}")


def test_swagger_try_it_out_with_a_client_key(open_page: OpenPage, live_site: LiveSite) -> None:
    page, traffic = open_page("en")
    swagger(page, live_site)

    page.locator(".scheme-container button.authorize").click()
    # The client key's scheme, not the operator token's (also a bearer) nor the session's
    # ("cookieAuth (apiKey)").
    scheme = page.locator(".auth-container", has=page.locator("h4", has_text=re.compile("^apiKey")))
    scheme.locator("input").fill(live_site.client_key)
    scheme.locator("button.authorize").click()
    # Authorized: the form now offers to log out instead.
    scheme.locator("button", has_text="Logout").wait_for()
    scheme.locator("button.btn-done").click()
    page.locator(".modal-ux").wait_for(state="detached")

    operation = page.locator(ME_OPERATION)
    operation.locator(".opblock-summary").first.click()
    operation.locator("button.try-out__btn").click()
    with page.expect_response(lambda r: r.url == f"{live_site.url}{ME_PATH}") as answer:
        operation.locator("button.execute").click()
    assert answer.value.status == 200
    assert answer.value.request.header_value("authorization") == f"Bearer {live_site.client_key}"

    live = operation.locator(".live-responses-table")
    status = live.locator("tr.response .response-col_status")
    status.wait_for()
    assert status.inner_text().strip() == "200"
    body = live.locator("tr.response .response-col_description .highlight-code pre")
    body.wait_for()
    assert f'"username": "{live_site.client_username}"' in body.inner_text()
    screenshot(page, "swagger-try-it-out")
    assert_stayed_home(traffic, "swagger-try-it-out")


# --- The admin ------------------------------------------------------------------------------------


def log_in(page: Page, site: LiveSite) -> None:
    page.goto(f"{site.url}/admin/login/?next=/admin/")
    page.locator("#id_username").fill(site.staff_username)
    page.locator("#id_password").fill(site.staff_password)
    page.locator("input[type=submit]").click()
    page.wait_for_url(f"{site.url}/admin/")


def assert_styled(page: Page) -> None:
    """The admin's CSS is applied, by what the browser computed: a 200 for base.css proves
    nothing if the page links it wrongly or a header blocks it."""
    header = page.locator("#header")
    background = header.evaluate("el => getComputedStyle(el).backgroundColor")
    assert background not in ("rgba(0, 0, 0, 0)", "transparent", "rgb(255, 255, 255)"), background
    # And the layout: the header is a flex row (base.css), not a block of stacked text.
    assert header.evaluate("el => getComputedStyle(el).display") == "flex"


ADMIN_LISTS = {
    "admin-api-keys": "/admin/accounts/apikey/",
    "admin-operator-tokens": "/admin/accounts/operatortoken/",
    "admin-ledger": "/admin/quotas/usagerecord/",
}


def test_the_admin_is_styled(open_page: OpenPage, live_site: LiveSite) -> None:
    page, traffic = open_page("ko")
    page.goto(f"{live_site.url}/admin/login/")
    assert_styled(page)
    log_in(page, live_site)
    assert_styled(page)
    # The index lists the apps the superuser may see.
    assert page.locator("#content-main .module").count() >= 3
    screenshot(page, "admin-index")
    for name, path in ADMIN_LISTS.items():
        page.goto(f"{live_site.url}{path}")
        assert_styled(page)
        # The module's data is there (conftest.make_site_data). At least one row: the ledger
        # worker also drains usage events earlier modules' gateways left in the stream.
        rows = page.locator("#result_list tbody tr")
        rows.first.wait_for()
        assert rows.count() >= 1, name
        screenshot(page, name)
    assert_stayed_home(traffic, "admin")


@pytest.mark.parametrize(
    ("language", "header", "button"),
    [("ko", "토큰 리미터 관리", "로그인"), ("en", "Token Limiter administration", "Log in")],
)
def test_the_admin_speaks_korean_unless_asked_for_english(
    open_page: OpenPage, live_site: LiveSite, language: str, header: str, button: str
) -> None:
    page, _ = open_page(language)
    page.goto(f"{live_site.url}/admin/login/")
    assert page.locator("html").get_attribute("lang") == language
    assert page.locator("#site-name").inner_text() == header
    assert page.locator("input[type=submit]").get_attribute("value") == button
    screenshot(page, f"admin-login-{language}")
