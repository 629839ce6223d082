"""Quota alert settings (quotas/alerts.py): validated in words, audited once per real change,
thresholds turned off rather than deleted, webhook URLs kept out of the audit log."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils import translation

from accounts.models import AuditAction, AuditEvent
from accounts.services import get_or_create_user
from quotas.alerts import (
    MAX_THRESHOLDS_PER_WINDOW,
    crossed,
    enabled_alerts,
    parse_percentages,
    period_end,
    period_start,
    set_quota_alerts,
)
from quotas.models import QuotaAlert, QuotaAlertSettings

pytestmark = pytest.mark.django_db
DAY, HOUR = "tokens_per_day", "tokens_per_hour"


@pytest.fixture
def user() -> Any:
    return get_or_create_user("알림이")[0]


def _audits(user: Any) -> list[AuditEvent]:
    return list(
        AuditEvent.objects.filter(
            action=AuditAction.QUOTA_ALERTS_CHANGED, target_type="auth.user", target_id=user.pk
        ).order_by("pk")
    )


def _on(user: Any) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for alert in enabled_alerts(user):
        found.setdefault(alert.window, []).append(alert.threshold_percent)
    return found


def test_thresholds_are_set_and_audited_once_per_change(user: Any) -> None:
    assert set_quota_alerts(user, actor=user, thresholds={DAY: [100, 80, 80], HOUR: [90]})
    assert _on(user) == {DAY: [80, 100], HOUR: [90]}
    [event] = _audits(user)
    assert event.actor == user
    assert event.details == {
        DAY: {"old": [], "new": [80, 100]},
        HOUR: {"old": [], "new": [90]},
    }
    # The same again: nothing written, no audit row.
    assert not set_quota_alerts(user, actor=user, thresholds={DAY: [80, 100], HOUR: [90]})
    assert len(_audits(user)) == 1
    # A window not given stays as it is.
    assert set_quota_alerts(user, actor=None, actor_label="cli", thresholds={DAY: [50]})
    assert _on(user) == {DAY: [50], HOUR: [90]}
    last = _audits(user)[-1]
    assert last.actor_label == "cli"
    assert last.details == {DAY: {"old": [80, 100], "new": [50]}}


def test_a_removed_threshold_is_turned_off_and_comes_back_as_the_same_row(user: Any) -> None:
    set_quota_alerts(user, actor=user, thresholds={DAY: [80, 100]})
    first = QuotaAlert.objects.get(user=user, window=DAY, threshold_percent=80)
    set_quota_alerts(user, actor=user, thresholds={DAY: [100]})
    first.refresh_from_db()
    assert not first.enabled  # kept: its deliveries stay, and it does not fire twice a period
    set_quota_alerts(user, actor=user, thresholds={DAY: [80, 100]})
    assert QuotaAlert.objects.filter(user=user, window=DAY).count() == 2
    first.refresh_from_db()
    assert first.enabled


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ([0], "0% is not between 1% and 100%."),
        ([101], "101% is not between 1% and 100%."),
        (["80"], "Enter whole percentages from 1 to 100."),
        ([True], "Enter whole percentages from 1 to 100."),
        ([1.5], "Enter whole percentages from 1 to 100."),
        ("80", "Enter a list of percentages."),
        (list(range(1, MAX_THRESHOLDS_PER_WINDOW + 2)), "Choose at most 10 thresholds per limit."),
    ],
)
def test_bad_thresholds_are_refused_in_words_and_nothing_is_written(
    user: Any, values: Any, words: str
) -> None:
    with translation.override("en"), pytest.raises(ValidationError) as caught:
        set_quota_alerts(user, actor=user, thresholds={DAY: [80], HOUR: values})
    assert caught.value.message_dict == {HOUR: [words]}
    assert not QuotaAlert.objects.filter(user=user).exists()  # the valid window neither
    assert _audits(user) == []


def test_an_unknown_window_is_a_programming_error(user: Any) -> None:
    with pytest.raises(ValueError, match="unknown alert window"):
        set_quota_alerts(user, actor=user, thresholds={"requests_per_minute": [80]})


def test_typed_percentages_are_parsed_or_refused_in_words() -> None:
    assert parse_percentages(" 75, 95% ,") == [75, 95]
    assert parse_percentages("") == []
    assert parse_percentages("60 70") == [60, 70]
    with translation.override("en"):
        for bad in ("75.5", "eighty", "٣٠", "-5"):
            with pytest.raises(ValidationError) as caught:
                parse_percentages(bad)
            assert caught.value.messages == [
                f"“{bad}” is not a whole percentage: enter numbers from 1 to 100, separated by "
                "commas."
            ]


def test_email_switch_is_audited(user: Any) -> None:
    assert QuotaAlertSettings.objects.filter(user=user).count() == 0
    assert not set_quota_alerts(user, actor=user, email_enabled=True)  # the default already
    assert QuotaAlertSettings.objects.filter(user=user).count() == 0
    assert set_quota_alerts(user, actor=user, email_enabled=False)
    assert not QuotaAlertSettings.objects.get(user=user).email_enabled
    assert _audits(user)[-1].details == {"email_enabled": {"old": True, "new": False}}


def test_webhook_urls_are_refused_while_the_operator_has_not_enabled_them(
    user: Any, settings: Any
) -> None:
    settings.QUOTA_ALERT_WEBHOOKS = False
    with translation.override("en"), pytest.raises(ValidationError) as caught:
        set_quota_alerts(user, actor=user, webhook_url="https://hooks.example.com/x")
    assert caught.value.message_dict == {"webhook_url": ["Webhooks are turned off on this server."]}
    # Clearing is always allowed (and here changes nothing).
    assert not set_quota_alerts(user, actor=user, webhook_url="")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://files.example.com/x", "Enter a web address that starts with http:// or https://."),
        ("javascript:alert(1)", "Enter a web address that starts with http:// or https://."),
        ("not a url", "Enter a web address that starts with http:// or https://."),
        (
            "https://user:secret@hooks.example.com/x",
            "The address must not contain a user name or password (user:password@).",
        ),
        ("https://hooks.example.com/" + "a" * 500, "Enter a URL of at most 500 characters."),
        (12, "Enter a text."),
    ],
)
def test_bad_webhook_urls_are_refused_in_words(
    user: Any, settings: Any, url: Any, words: str
) -> None:
    settings.QUOTA_ALERT_WEBHOOKS = True
    with translation.override("en"), pytest.raises(ValidationError) as caught:
        set_quota_alerts(user, actor=user, webhook_url=url)
    assert caught.value.message_dict == {"webhook_url": [words]}
    assert not QuotaAlertSettings.objects.filter(user=user).exists()


def test_a_webhook_secret_never_reaches_the_audit_log(user: Any, settings: Any) -> None:
    settings.QUOTA_ALERT_WEBHOOKS = True
    secret = "https://hooks.slack.com/services/T000/B000/s3cr3t-t0k3n"
    assert set_quota_alerts(user, actor=user, webhook_url=f"  {secret} ")
    assert QuotaAlertSettings.objects.get(user=user).webhook_url == secret
    # Only the secret part changes: still audited, still without it.
    assert set_quota_alerts(user, actor=user, webhook_url=secret.replace("s3cr3t", "n3w"))
    events = _audits(user)
    assert [e.details for e in events] == [
        {"webhook_url": {"old": "", "new": "https://hooks.slack.com/…"}},
        {"webhook_url": {"old": "https://hooks.slack.com/…", "new": "https://hooks.slack.com/…"}},
    ]
    assert all("t0k3n" not in str(e.details) for e in events)


def test_periods_are_the_local_day_and_the_clock_hour() -> None:
    # 2026-03-04 15:30:20 UTC is 2026-03-05 00:30:20 in Seoul.
    moment = datetime(2026, 3, 4, 15, 30, 20, tzinfo=UTC)
    day = period_start(DAY, moment)
    assert day.isoformat() == "2026-03-05T00:00:00+09:00"
    assert period_end(DAY, day).isoformat() == "2026-03-06T00:00:00+09:00"
    hour = period_start(HOUR, moment)
    assert hour.isoformat() == "2026-03-05T00:00:00+09:00"
    assert period_end(HOUR, hour).isoformat() == "2026-03-05T01:00:00+09:00"
    assert period_start(HOUR, datetime(2026, 3, 4, 16, 59, 59, tzinfo=UTC)).hour == 1


def test_a_threshold_is_crossed_exactly_at_its_share_of_the_limit() -> None:
    assert not crossed(799, 1000, 80)
    assert crossed(800, 1000, 80)
    assert crossed(1200, 1000, 100)
    # 33 % of 1,001 is 330.33 tokens: 330 is below it, 331 past it (no rounding either way).
    assert not crossed(330, 1001, 33)
    assert crossed(331, 1001, 33)
    assert not crossed(10**9, 0, 1)  # no limit, nothing to cross
