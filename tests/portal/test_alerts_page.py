"""사용량 알림 (portal/alert_views.py): a user's own thresholds and their state, changed through a
CSRF-protected form (POST, then redirect), isolated between users, at a fixed query cost."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import pytest
from django.test import Client

from accounts.models import AuditAction, AuditEvent
from quotas.alerts import alert_settings, enabled_alerts, set_quota_alerts
from quotas.services import default_plan, set_user_quota
from telemetry.alerts import check_quota_alerts
from tests.api.conftest import Person
from tests.portal.conftest import logged_in, text
from tests.telemetry.test_alert_check import use

pytestmark = pytest.mark.django_db
DAY, HOUR = "tokens_per_day", "tokens_per_hour"


@pytest.fixture(autouse=True)
def own_limiter_state(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import limits

    settings.LIMITER_REDIS_PREFIX = f"{settings.LIMITER_REDIS_PREFIX}-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(limits, "_embedded", None)


def _thresholds(person: Person) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for alert in enabled_alerts(person.user):
        found.setdefault(alert.window, []).append(alert.threshold_percent)
    return found


def _token(page: str) -> str:
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert found
    return found.group(1)


def _states(page: str, window: str) -> dict[int, str]:
    block = page.split(f'data-alert-window="{window}"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'data-threshold="(\d+)">.*?data-state="(\w+)"', block, re.S)
    return {int(percent): state for percent, state in rows}


def test_the_page_needs_a_login(client: Client) -> None:
    response = client.get("/alerts/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/alerts/"
    assert client.post("/alerts/", {"day_percents": ["80"]}).status_code == 302


def test_a_user_sets_thresholds_with_the_form(alice: Person) -> None:
    client = logged_in(alice, csrf=True, language="en")
    page = text(client.get("/alerts/"))
    assert "No thresholds set." in page
    form = {
        "csrfmiddlewaretoken": _token(page),
        "day_percents": ["80", "100"],
        "day_other": "75, 95%",
        "hour_percents": ["90"],
        "hour_other": "",
        "email_enabled": "on",
    }
    response = client.post("/alerts/", form)
    assert response.status_code == 302 and response["Location"] == "/alerts/"
    assert _thresholds(alice) == {DAY: [75, 80, 95, 100], HOUR: [90]}
    [event] = AuditEvent.objects.filter(action=AuditAction.QUOTA_ALERTS_CHANGED)
    assert event.actor == alice.user
    page = text(client.get("/alerts/"))
    assert "Your alerts were saved." in page
    # The form shows what is set: the suggested ones ticked, the others typed.
    assert re.search(r'name="day_percents" value="80"[^>]*checked', page)
    assert not re.search(r'name="day_percents" value="50"[^>]*checked', page)
    assert 'name="day_other" value="75, 95"' in page
    assert set(_states(page, DAY)) == {75, 80, 95, 100}
    # Saving the same again changes nothing and says so.
    form["csrfmiddlewaretoken"] = _token(page)
    client.post("/alerts/", form)
    assert "Nothing changed." in text(client.get("/alerts/"))
    assert AuditEvent.objects.filter(action=AuditAction.QUOTA_ALERTS_CHANGED).count() == 1


def test_a_post_without_the_csrf_token_is_refused(alice: Person) -> None:
    client = logged_in(alice, csrf=True)
    assert client.post("/alerts/", {"day_percents": ["80"]}).status_code == 403
    assert _thresholds(alice) == {}


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("day_other", "eighty", "“eighty” is not a whole percentage"),
        ("hour_other", "0", "0% is not between 1% and 100%."),
        ("day_other", "1 2 3 4 5 6 7 8 9 10 11", "Choose at most 10 thresholds per limit."),
        ("day_percents", "85", "Select a valid choice. 85 is not one of the available choices."),
    ],
)
def test_a_bad_form_is_answered_in_words_and_changes_nothing(
    alice: Person, field: str, value: str, words: str
) -> None:
    set_quota_alerts(alice.user, actor=alice.user, thresholds={DAY: [80]})
    client = logged_in(alice, language="en")
    response = client.post("/alerts/", {field: value, "email_enabled": "on"})
    assert response.status_code == 400
    assert words in text(response)
    assert _thresholds(alice) == {DAY: [80]}


def test_the_webhook_field_is_there_only_when_the_operator_enabled_webhooks(
    alice: Person, settings: Any
) -> None:
    client = logged_in(alice, language="en")
    settings.QUOTA_ALERT_WEBHOOKS = False
    assert 'name="webhook_url"' not in text(client.get("/alerts/"))
    # A crafted POST with the field is ignored, not stored.
    client.post("/alerts/", {"email_enabled": "on", "webhook_url": "http://10.0.0.1/x"})
    assert alert_settings(alice.user).webhook_url == ""
    settings.QUOTA_ALERT_WEBHOOKS = True
    assert 'name="webhook_url"' in text(client.get("/alerts/"))
    response = client.post(
        "/alerts/", {"email_enabled": "on", "webhook_url": "https://u:p@hooks.example.com/x"}
    )
    assert response.status_code == 400
    assert "must not contain a user name or password" in text(response)
    response = client.post(
        "/alerts/", {"email_enabled": "on", "webhook_url": "https://hooks.example.com/x"}
    )
    assert response.status_code == 302
    assert alert_settings(alice.user).webhook_url == "https://hooks.example.com/x"


def test_a_user_without_an_email_address_is_warned(alice: Person) -> None:
    client = logged_in(alice, language="en")
    assert "data-no-email" in text(client.get("/alerts/"))
    alice.user.email = "alice@example.kr"
    alice.user.save(update_fields=["email"])
    page = text(client.get("/alerts/"))
    assert "data-no-email" not in page
    assert "(alice@example.kr)" in page


def test_thresholds_show_their_state_this_period(alice: Person) -> None:
    set_user_quota(alice.user, default_plan(), actor=None, tokens_per_day=1000)
    alice.user.email = "alice@example.kr"
    alice.user.save(update_fields=["email"])
    set_quota_alerts(alice.user, actor=alice.user, thresholds={DAY: [50, 90], HOUR: [80]})
    client = logged_in(alice, language="en")
    use(alice, 600, time.time())
    page = text(client.get("/alerts/"))
    assert _states(page, DAY) == {50: "reached", 90: "waiting"}
    assert "600 of 1,000 tokens used (60.0 %)" in page
    check_quota_alerts()
    page = text(client.get("/alerts/"))
    assert _states(page, DAY) == {50: "sent", 90: "waiting"}
    assert _states(page, HOUR) == {80: "waiting"}
    assert 'id="recent-deliveries"' in page and "600 / 1,000" in page


def test_two_users_see_and_change_only_their_own(alice: Person, bob: Person) -> None:
    for person in (alice, bob):
        set_user_quota(person.user, default_plan(), actor=None, tokens_per_day=1000)
        person.user.email = f"{person.user.pk}@example.kr"
        person.user.save(update_fields=["email"])
    set_quota_alerts(bob.user, actor=bob.user, thresholds={DAY: [33], HOUR: [77]})
    use(bob, 500, time.time())
    check_quota_alerts()
    set_quota_alerts(alice.user, actor=alice.user, thresholds={DAY: [90]})
    page = text(logged_in(alice, language="en").get("/alerts/"))
    assert 'data-threshold="33"' not in page and 'data-threshold="77"' not in page
    assert "No notifications yet." in page
    assert "500 / 1,000" not in page
    logged_in(alice).post("/alerts/", {"day_percents": ["50"], "email_enabled": "on"})
    assert _thresholds(bob) == {DAY: [33], HOUR: [77]}
    assert _thresholds(alice) == {DAY: [50]}
    bobs = text(logged_in(bob, language="en").get("/alerts/"))
    assert _states(bobs, DAY) == {33: "sent"}
    assert "500 / 1,000" in bobs


def test_the_page_costs_a_fixed_number_of_queries(
    alice: Person, django_assert_num_queries: Any
) -> None:
    client = logged_in(alice)
    # Session, user, alerts, settings, quota with plan, recent deliveries.
    with django_assert_num_queries(6):
        assert client.get("/alerts/").status_code == 200
    set_user_quota(alice.user, default_plan(), actor=None, tokens_per_day=1000)
    alice.user.email = "alice@example.kr"
    alice.user.save(update_fields=["email"])
    set_quota_alerts(alice.user, actor=alice.user, thresholds={DAY: [10, 20, 30], HOUR: [90]})
    use(alice, 400, time.time())
    check_quota_alerts()
    # The same and this period's deliveries of the alerts (however many alerts and windows).
    with django_assert_num_queries(7):
        assert client.get("/alerts/").status_code == 200
