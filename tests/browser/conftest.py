"""Real-browser tests: headless Chromium (Debian's `chromium` package, never a browser build
that Playwright downloads) driven by Playwright, against the real server process (uvicorn, as
the README serves it) on the test database.

Like tests/gateway/conftest.py, the data is created once per module through the services and
committed (the server reads it through its own connection), then removed at the end. Every
page the tests open is saved as a full-page PNG under var/screenshots/, for a person to look at.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from tests.gateway.conftest import database_url_for_subprocess, gateway_args
from tests.procs import ROOT, free_port, ledger_worker, running, simulator

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Request

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "var" / "screenshots"
# Every wait for the page has a deadline: a missing element fails the test within seconds
# instead of at pytest-timeout's 120 s.
TIMEOUT_MS = 15_000

STAFF_USERNAME = "browser-operator"
# Passes AUTH_PASSWORD_VALIDATORS (long, not common, not numeric, unlike the username).
STAFF_PASSWORD = "correct-horse-battery-staple-7"
CLIENT_USERNAME = "브라우저고객"
CLIENT_PASSWORD = "blue-river-lantern-owl-42"
# The model the pages' end-to-end tests call through the gateway, served by the SGLang
# simulator (standing in for the GPU, and only for it).
MODEL = "Qwen/Qwen2.5-7B-Instruct"


def _missing(reason: str) -> None:
    # As tests/conftest.py does for Postgres and Redis: CI can never go green by skipping.
    if IN_CI:
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Chromium and Playwright are there (checked before any server starts)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("needs Playwright for Python (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        _missing(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium: Path, live_site: LiveSite) -> Iterator[Browser]:
    """One headless Chromium for the module's tests.

    Not session-scoped, and started after the live site's data (torn down before its
    clean-up): Playwright's sync API runs its event loop in a greenlet of the main thread, so
    while it lives asyncio reports a running loop there and Django refuses every database query
    of the test process (SynchronousOnlyOperation). A session-wide browser would break every
    test module that runs after this one."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright passes --no-sandbox by default (chromium_sandbox=False), which Chromium
        # needs when it runs as root, as CI does.
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True)
        try:
            yield browser
        finally:
            browser.close()


# --- The live site and its data ---------------------------------------------------------------


@dataclass(frozen=True)
class LiveSite:
    url: str
    staff_username: str
    staff_password: str
    client_username: str
    client_key: str
    client_password: str = CLIENT_PASSWORD
    model: str = MODEL

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@dataclass
class Watermarks:
    """The last id of each append-only table before the module wrote anything: what is above
    it afterwards is the module's own (audit rows outlive their targets by design)."""

    audit_event: int
    default_plan_existed: bool


def _watermarks() -> Watermarks:
    from django.db.models import Max

    from accounts.models import AuditEvent
    from quotas.models import Plan
    from quotas.services import DEFAULT_PLAN_NAME

    return Watermarks(
        audit_event=AuditEvent.objects.aggregate(last=Max("pk"))["last"] or 0,
        default_plan_existed=Plan.objects.filter(name=DEFAULT_PLAN_NAME).exists(),
    )


def make_site_data() -> tuple[str, dict[str, Any]]:
    """A superuser with a password and an operator token; a client on the default plan with an
    API key and one ledger row, so that every admin list the tests look at has a row. Returns
    the client's raw key and the ids the clean-up needs."""
    import time

    from django.contrib.auth.models import User

    from accounts.services import create_api_key, create_operator_token, get_or_create_user
    from quotas.services import default_plan, record_usage_rows, set_user_quota
    from tokenlimit.ledger_rows import UsageRow

    # As `manage.py createsuperuser` does: no service sets is_superuser, by design (the admin's
    # lists need the permissions a superuser has).
    staff = User.objects.create_superuser(STAFF_USERNAME, "", STAFF_PASSWORD)
    set_user_quota(staff, default_plan(), actor=None)
    create_operator_token(staff, actor=staff, name="browser test", scope="read")

    client, _ = get_or_create_user(CLIENT_USERNAME)
    client.set_password(CLIENT_PASSWORD)  # as an operator does in the admin
    client.save(update_fields=["password"])
    set_user_quota(client, default_plan(), actor=None)
    key, raw_key = create_api_key(client, actor=None, name="browser test key")
    now = time.time()
    dead = record_usage_rows(
        [
            UsageRow(
                request_id=f"browser-{uuid.uuid4().hex}",
                user_id=client.pk,
                api_key_id=key.pk,
                model="Qwen/Qwen2.5-7B-Instruct",
                endpoint="chat",
                status_code=200,
                streamed=False,
                started_at=now - 1.5,
                finished_at=now,
                prompt_tokens=12,
                completion_tokens=7,
            )
        ],
        "browser-test",
    )
    assert dead == 0
    return raw_key, {"users": [staff.pk, client.pk]}


def serve_model(upstream: str) -> bool:
    """The simulator as MODEL's upstream; True if this module created the row."""
    from gateway.models import ServedModel

    _, created = ServedModel.objects.update_or_create(
        name=MODEL, defaults={"upstream_url": upstream}
    )
    return created


def remove_site_data(user_ids: list[int], marks: Watermarks) -> None:
    from axes.models import AccessAttempt, AccessFailureLog, AccessLog
    from django.contrib.auth.models import User
    from django.contrib.sessions.models import Session

    from accounts.models import AuditEvent
    from quotas.models import Plan, UsageRecord
    from quotas.services import DEFAULT_PLAN_NAME

    users = User.objects.filter(pk__in=user_ids)
    usernames = list(users.values_list("username", flat=True))
    UsageRecord.objects.filter(user__in=users).delete()
    ids = {str(pk) for pk in user_ids}
    Session.objects.filter(
        pk__in=[s.pk for s in Session.objects.all() if s.get_decoded().get("_auth_user_id") in ids]
    ).delete()
    for log in (AccessAttempt, AccessFailureLog, AccessLog):
        log.objects.filter(username__in=usernames).delete()
    users.delete()  # their keys, operator tokens and quotas go with them
    AuditEvent.objects.filter(pk__gt=marks.audit_event).delete()
    if not marks.default_plan_existed:
        Plan.objects.filter(name=DEFAULT_PLAN_NAME, quotas__isnull=True).delete()


@pytest.fixture(scope="module")
def live_site(chromium: Path, django_db_setup: None, django_db_blocker: Any) -> Iterator[LiveSite]:
    # After `chromium`: a test that will be skipped for want of a browser starts no server.
    with ExitStack() as stack:
        upstream = stack.enter_context(simulator(MODEL))
        with django_db_blocker.unblock():
            marks = _watermarks()
            raw_key, created = make_site_data()
            created_model = serve_model(upstream)
            database_url = database_url_for_subprocess()
        stack.callback(_clean_up, django_db_blocker, created["users"], marks, created_model)
        env = {"DATABASE_URL": database_url, "SGLANG_URL": upstream}
        # Usage reaches the ledger (and the pages) through the Redis stream and a real worker.
        stack.enter_context(ledger_worker(env))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with running(gateway_args(port), f"{url}/health", env=env):
            yield LiveSite(
                url=url,
                staff_username=STAFF_USERNAME,
                staff_password=STAFF_PASSWORD,
                client_username=CLIENT_USERNAME,
                client_key=raw_key,
            )


def _clean_up(blocker: Any, user_ids: list[int], marks: Watermarks, created_model: bool) -> None:
    from gateway.models import ServedModel

    with blocker.unblock():
        remove_site_data(user_ids, marks)
        if created_model:
            ServedModel.objects.filter(name=MODEL).delete()


# --- Pages, their traffic and screenshots ------------------------------------------------------


@dataclass
class Traffic:
    """Every request a browser context made, by URL, and how the ones that failed failed."""

    origin: str
    requested: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (url, failure text)

    def is_local(self, url: str) -> bool:
        scheme = urlsplit(url).scheme
        if scheme in ("blob", "data"):
            return True
        return origin_of(url) == self.origin

    def blocked_by_csp(self) -> list[str]:
        """Requests the page's content security policy stopped in the browser: attempted, but
        nothing left the machine."""
        return [url for url, failure in self.failed if failure == "csp"]

    def log(self) -> str:
        """One line per request: its URL and how it ended."""
        failures = dict(self.failed)
        lines = []
        for url in self.requested:
            if url in failures:
                lines.append(f"failed ({failures[url]}) {url}")
            else:
                lines.append(f"{'finished' if url in self.finished else 'pending'} {url}")
        return "\n".join(lines) + "\n"

    def external(self) -> list[str]:
        """Requests for another origin that the CSP did not stop (the route below aborts them,
        so they cannot reach anything either, online or off: they are what the page *would*
        have fetched from outside)."""
        csp = set(self.blocked_by_csp())
        return [url for url in self.requested if not self.is_local(url) and url not in csp]


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def watch(context: BrowserContext, origin: str) -> Traffic:
    traffic = Traffic(origin)

    def failed(request: Request) -> None:
        traffic.failed.append((request.url, request.failure or ""))

    context.on("request", lambda request: traffic.requested.append(request.url))
    context.on("requestfinished", lambda request: traffic.finished.append(request.url))
    context.on("requestfailed", failed)
    # A firewall of our own: whatever the CSP lets through to another origin is aborted here,
    # so a test on a connected machine contacts nobody and sees what an offline one sees.
    context.route(
        lambda url: not traffic.is_local(url), lambda route: route.abort("blockedbyclient")
    )
    return traffic


OpenPage = Callable[..., tuple["Page", Traffic]]


@pytest.fixture
def open_page(browser: Browser, live_site: LiveSite) -> Iterator[OpenPage]:
    """open_page(language="ko") -> (page, traffic): a page in a fresh context (no cookies, no
    storage) whose browser speaks `language`, with its requests recorded."""
    contexts: list[BrowserContext] = []

    def open_(language: str = "ko") -> tuple[Page, Traffic]:
        context = browser.new_context(
            locale=language,
            # Exactly the header the brief of each test names, not Chromium's "ko,en;q=0.9".
            extra_http_headers={"Accept-Language": language},
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        traffic = watch(context, origin_of(live_site.url))
        return context.new_page(), traffic

    yield open_
    for context in contexts:
        context.close()


def screenshot(page: Page, name: str) -> Path:
    """The whole page (not only the viewport) as var/screenshots/<name>.png, written on every
    run, for a person to look at after a change to the pages."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def save_traffic(traffic: Traffic, name: str) -> Path:
    """The page's requests as var/screenshots/<name>.requests.txt, beside its screenshot: what
    the page's CSP stopped is allowed but worth knowing about."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.requests.txt"
    path.write_text(traffic.log())
    return path
