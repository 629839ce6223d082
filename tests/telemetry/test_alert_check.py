"""The quota alert check (telemetry/alerts.py) against the real limiter: usage is made by
reserving and settling through the gateway's own limiter (Redis when REDIS_URL is set), at
chosen moments, and the check reads it as /api/v1/me does."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.db import connection

from gateway.embedded_beat import EmbeddedBeat, embedded_beat
from quotas.alerts import set_quota_alerts
from quotas.models import DELIVERY_ERROR_MAX, QuotaAlertDelivery
from telemetry import alerts
from telemetry.alerts import CheckResult, check_quota_alerts, clamp_error
from tests.api.conftest import Person, make_person

pytestmark = pytest.mark.django_db
SEOUL = ZoneInfo("Asia/Seoul")
DAY, HOUR = "tokens_per_day", "tokens_per_hour"


@pytest.fixture(autouse=True)
def own_limiter_state(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counters of this test only: on SQLite user ids repeat from test to test, and these tests
    put usage at moments of their choosing (Redis: a prefix of its own; embedded: a fresh
    in-memory limiter for the process)."""
    from gateway import limits

    settings.LIMITER_REDIS_PREFIX = f"{settings.LIMITER_REDIS_PREFIX}-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(limits, "_embedded", None)


def use(person: Person, tokens: int, at: float) -> None:
    """Reserve and settle `tokens` for `person` at the moment `at`, through the gateway's limiter
    (what a request that used them leaves behind)."""
    from accounts.services import hash_key
    from gateway.limits import GatewayLimiter, make_backend, shared_backend
    from quotas.services import load_key_grant

    grant = load_key_grant(hash_key(person.raw_key))
    assert grant is not None

    async def run() -> None:
        backend = make_backend() if settings.REDIS_URL else shared_backend()
        limiter = GatewayLimiter(backend, clock=lambda: at)
        rid = uuid.uuid4().hex
        assert await limiter.admit(grant, rid, tokens, "m") is not None
        await limiter.settle(grant, rid, tokens)
        if settings.REDIS_URL:
            await limiter.close()

    asyncio.run(run())


def noon_today() -> float:
    """Today's 12:00 in Seoul: far from both ends of the day and from a clock hour's edges."""
    today = datetime.now(SEOUL).replace(hour=12, minute=0, second=0, microsecond=0)
    return today.timestamp()


def person(name: str, *, email: str | None = None, **limits: int) -> Person:
    found = make_person(f"{name}-{uuid.uuid4().hex[:6]}", **limits)
    found.user.email = email if email is not None else f"{name}@example.kr"
    found.user.save(update_fields=["email"])
    return found


def deliveries(p: Person) -> list[QuotaAlertDelivery]:
    return list(
        QuotaAlertDelivery.objects.filter(alert__user=p.user)
        .select_related("alert")
        .order_by("alert__threshold_percent", "period_start")
    )


def test_each_threshold_is_sent_once_per_period_and_again_the_next_day(
    mailoutbox: list[Any],
) -> None:
    alice = person("alice", tokens_per_day=1000)
    set_quota_alerts(alice.user, actor=alice.user, thresholds={DAY: [50, 80, 100]})
    noon = noon_today()
    use(alice, 850, noon)
    first = check_quota_alerts(now=noon + 1)
    # 50 % and 80 % crossed together: two deliveries, one message (the higher threshold).
    assert (first.crossed, first.sent, first.failed) == (2, 1, 0)
    assert len(mailoutbox) == 1
    assert "80%" in mailoutbox[0].subject
    for repeat in (2, 30, 600):
        again = check_quota_alerts(now=noon + repeat)
        assert (again.users, again.crossed, again.sent) == (1, 0, 0)
    assert len(mailoutbox) == 1
    use(alice, 150, noon + 700)  # all of it
    assert check_quota_alerts(now=noon + 701).sent == 1
    assert len(mailoutbox) == 2 and "100%" in mailoutbox[1].subject
    assert [(d.alert.threshold_percent, d.status) for d in deliveries(alice)] == [
        (50, "sent"),
        (80, "sent"),
        (100, "sent"),
    ]
    # The next day starts from zero; 600 tokens cross 50 % again, in a new period.
    tomorrow = datetime.fromtimestamp(noon, SEOUL) + timedelta(days=1)
    morning = tomorrow.replace(hour=0, minute=5).timestamp()
    assert check_quota_alerts(now=morning).crossed == 0
    use(alice, 600, morning)
    assert check_quota_alerts(now=morning + 1).crossed == 1
    assert len(mailoutbox) == 3 and "50%" in mailoutbox[2].subject
    fifty = [d for d in deliveries(alice) if d.alert.threshold_percent == 50]
    assert [d.period_start.astimezone(SEOUL).day for d in fifty] == [
        datetime.fromtimestamp(noon, SEOUL).day,
        tomorrow.day,
    ]


def test_the_hourly_window_alerts_once_per_clock_hour(mailoutbox: list[Any]) -> None:
    bob = person("bob", tokens_per_hour=1000)
    set_quota_alerts(bob.user, actor=bob.user, thresholds={HOUR: [80]})
    half_past = noon_today() + 1800  # 12:30
    use(bob, 900, half_past)
    assert check_quota_alerts(now=half_past + 1).sent == 1
    assert check_quota_alerts(now=half_past + 1200).crossed == 0  # 12:50, same hour
    # 13:01: the 900 tokens are still in the last 60 minutes, and it is a new clock hour.
    assert check_quota_alerts(now=half_past + 1860).sent == 1
    assert len(mailoutbox) == 2
    # The sliding hour gives room again when the tokens used at 12:30 leave it: 13:30.
    assert "13:30 KST" in mailoutbox[1].body
    # 14:00: they left the window; nothing crossed any more.
    assert check_quota_alerts(now=half_past + 5400).crossed == 0


def test_the_email_has_the_numbers_the_reset_in_kst_and_links(
    mailoutbox: list[Any], settings: Any
) -> None:
    settings.PORTAL_BASE_URL = "https://llm.example.kr"
    settings.DEFAULT_FROM_EMAIL = "limiter@example.kr"
    alice = person("alice", tokens_per_day=1000)
    set_quota_alerts(alice.user, actor=alice.user, thresholds={DAY: [80]})
    noon = noon_today()
    use(alice, 850, noon)
    settings.LANGUAGE_CODE = "en"
    check_quota_alerts(now=noon + 1)
    [message] = mailoutbox
    assert message.to == [alice.user.email]
    assert message.from_email == "limiter@example.kr"
    assert message.subject == "[Token Limiter] 80% of your daily token quota used"
    midnight = (datetime.fromtimestamp(noon, SEOUL) + timedelta(days=1)).strftime("%Y-%m-%d")
    body = message.body
    assert f"Hello {alice.user.username}," in body
    assert "You have used 850 of your 1,000 tokens (85.0%)" in body
    assert "past the 80% alert you set" in body
    assert f"starts again at midnight: {midnight} 00:00 KST." in body
    assert "Your usage: https://llm.example.kr/\n" in body
    assert "Change or turn off these alerts: https://llm.example.kr/alerts/\n" in body
    assert "refused" not in body  # under the limit: nothing is refused yet


def test_the_email_is_in_the_default_language(mailoutbox: list[Any], settings: Any) -> None:
    settings.LANGUAGE_CODE = "ko"
    alice = person("alice", tokens_per_day=1000)
    set_quota_alerts(alice.user, actor=alice.user, thresholds={DAY: [100]})
    noon = noon_today()
    use(alice, 1000, noon)
    check_quota_alerts(now=noon + 1)
    [message] = mailoutbox
    assert message.subject.startswith("[토큰 리미터] ")
    assert "1,000" in message.body and "100.0" in message.body


def test_without_an_email_address_nothing_is_claimed_until_one_is_added(
    mailoutbox: list[Any],
) -> None:
    carol = person("carol", email="", tokens_per_day=1000)
    set_quota_alerts(carol.user, actor=carol.user, thresholds={DAY: [80]})
    noon = noon_today()
    use(carol, 900, noon)
    result = check_quota_alerts(now=noon + 1)
    assert (result.crossed, result.no_channel) == (0, 1)
    assert deliveries(carol) == []
    carol.user.email = "carol@example.kr"
    carol.user.save(update_fields=["email"])
    assert check_quota_alerts(now=noon + 2).sent == 1
    assert [m.to for m in mailoutbox] == [["carol@example.kr"]]
    # Email turned off (and no webhook): nothing is sent, nothing claimed.
    set_quota_alerts(carol.user, actor=carol.user, thresholds={DAY: [80, 90]}, email_enabled=False)
    assert check_quota_alerts(now=noon + 3).no_channel == 2  # both thresholds
    assert len(mailoutbox) == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_checks_racing_send_once(
    mailoutbox: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = person("alice", tokens_per_day=1000)
    set_quota_alerts(alice.user, actor=alice.user, thresholds={DAY: [80]})
    noon = noon_today()
    use(alice, 900, noon)
    # Both checks get past "already delivered?" before either inserts: the unique constraint
    # alone must decide.
    barrier = threading.Barrier(2)
    real_claim = alerts._claim

    def claim(*args: Any) -> Any:
        barrier.wait(timeout=20)
        return real_claim(*args)

    monkeypatch.setattr(alerts, "_claim", claim)
    results: list[CheckResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(check_quota_alerts(now=noon + 1))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(results) == 2
    assert sorted(r.crossed for r in results) == [0, 1]
    assert len(mailoutbox) == 1
    assert len(deliveries(alice)) == 1


# --- Webhooks, against a real HTTP server on this machine -------------------------------------


@dataclass
class Hook:
    base: str = ""
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {name.lower(): value for name, value in self.headers.items()}
            state.requests.append((self.path, headers, body))
            if self.path.startswith("/fail"):
                # A server that answers with a reason phrase longer than the error column.
                self.send_response(500, "x" * 2000)
            elif self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("location", f"{state.base}/elsewhere")
            else:
                self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_a_webhook_gets_the_alert_as_json(hook: Hook, mailoutbox: list[Any], settings: Any) -> None:
    settings.QUOTA_ALERT_WEBHOOKS = True
    settings.PORTAL_BASE_URL = "https://llm.example.kr"
    dave = person("dave", tokens_per_hour=2000)
    set_quota_alerts(
        dave.user,
        actor=dave.user,
        thresholds={HOUR: [50]},
        email_enabled=False,
        webhook_url=f"{hook.base}/hooks/dave",
    )
    noon = noon_today()
    use(dave, 1500, noon)
    assert check_quota_alerts(now=noon + 1).sent == 1
    assert mailoutbox == []  # email off
    [(path, headers, body)] = hook.requests
    assert path == "/hooks/dave"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == alerts.USER_AGENT
    payload = json.loads(body)
    assert payload | {"text": "…"} == {
        "type": "quota_alert",
        "text": "…",
        "user": dave.user.username,
        "window": HOUR,
        "threshold_percent": 50,
        "thresholds_crossed": [50],
        "used": 1500,
        "limit": 2000,
        "percent": 75.0,
        "period_start": datetime.fromtimestamp(noon, SEOUL).isoformat(),
        "resets_at": datetime.fromtimestamp(noon + 3600, SEOUL).isoformat(),
        "portal_url": "https://llm.example.kr/alerts/",
    }
    assert "50%" in payload["text"]
    [delivery] = deliveries(dave)
    assert (delivery.channel, delivery.status, delivery.error) == ("webhook", "sent", "")
    assert delivery.sent_at is not None


def test_a_failing_webhook_is_recorded_clamped_and_blocks_nobody(
    hook: Hook, mailoutbox: list[Any], settings: Any
) -> None:
    settings.QUOTA_ALERT_WEBHOOKS = True
    erin = person("erin", tokens_per_day=1000)
    frank = person("frank", tokens_per_day=1000)
    gina = person("gina", tokens_per_day=1000)
    set_quota_alerts(
        erin.user, actor=erin.user, thresholds={DAY: [80]}, webhook_url=f"{hook.base}/fail"
    )
    set_quota_alerts(
        frank.user,
        actor=frank.user,
        thresholds={DAY: [80]},
        email_enabled=False,
        webhook_url=f"{hook.base}/redirect",
    )
    set_quota_alerts(gina.user, actor=gina.user, thresholds={DAY: [80]})
    noon = noon_today()
    for p in (erin, frank, gina):
        use(p, 900, noon)
    result = check_quota_alerts(now=noon + 1)
    assert (result.crossed, result.sent, result.failed) == (3, 1, 2)
    # Erin's email went out although her webhook failed; Gina's was not held up.
    assert sorted(m.to[0] for m in mailoutbox) == sorted([erin.user.email, gina.user.email])
    [erins] = deliveries(erin)
    assert (erins.channel, erins.status) == ("email+webhook", "failed")
    assert erins.sent_at is not None  # the email part was delivered
    assert len(erins.error) == DELIVERY_ERROR_MAX
    assert erins.error.startswith("webhook: HTTP 500 xxxx") and erins.error.endswith("…")
    # A redirect is not followed: a failure, and the other address never hears of it.
    [franks] = deliveries(frank)
    assert (franks.status, franks.error, franks.sent_at) == (
        "failed",
        "webhook: HTTP 302 Found",
        None,
    )
    assert [path for path, _, _ in hook.requests].count("/elsewhere") == 0
    # Never retried: the next check leaves the failures as they are.
    assert check_quota_alerts(now=noon + 60).crossed == 0
    assert len(hook.requests) == 2


def test_a_stored_webhook_is_not_called_once_the_operator_turns_webhooks_off(
    hook: Hook, mailoutbox: list[Any], settings: Any
) -> None:
    settings.QUOTA_ALERT_WEBHOOKS = True
    hana = person("hana", tokens_per_day=1000)
    set_quota_alerts(
        hana.user, actor=hana.user, thresholds={DAY: [80]}, webhook_url=f"{hook.base}/h"
    )
    settings.QUOTA_ALERT_WEBHOOKS = False
    noon = noon_today()
    use(hana, 900, noon)
    assert check_quota_alerts(now=noon + 1).sent == 1
    assert hook.requests == []
    assert [d.channel for d in deliveries(hana)] == ["email"]
    assert len(mailoutbox) == 1


def test_errors_lose_nul_characters_and_fit_their_column() -> None:
    assert clamp_error("a\x00b") == "ab"
    long = clamp_error("é" * 1000)
    assert len(long) == DELIVERY_ERROR_MAX and long.endswith("…")


def test_an_unreachable_limiter_stops_the_check_and_records_nothing(
    mailoutbox: list[Any], settings: Any
) -> None:
    alice = person("alice", tokens_per_day=1000)
    set_quota_alerts(alice.user, actor=alice.user, thresholds={DAY: [1]})
    use(alice, 900, noon_today())
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    result = check_quota_alerts(now=noon_today() + 1)
    assert result.limiter_unavailable
    assert deliveries(alice) == [] and mailoutbox == []


def test_queries_do_not_grow_with_the_number_of_users(
    django_assert_num_queries: Any, mailoutbox: list[Any]
) -> None:
    noon = noon_today()

    def crowd(n: int) -> list[Person]:
        people = [person(f"q{n}-{i}", tokens_per_day=1000) for i in range(n)]
        for p in people:
            set_quota_alerts(p.user, actor=p.user, thresholds={DAY: [50, 80], HOUR: [90]})
            use(p, 850, noon)
        return people

    few = crowd(2)
    # Users (with quota, plan, settings), their alerts, the deliveries already made, the
    # insert of the new ones, their outcome.
    with django_assert_num_queries(5):
        assert check_quota_alerts(now=noon + 1).crossed == 4
    with django_assert_num_queries(3):
        assert check_quota_alerts(now=noon + 2).crossed == 0
    QuotaAlertDelivery.objects.filter(alert__user__in=[p.user for p in few]).delete()
    crowd(10)
    with django_assert_num_queries(5):
        assert check_quota_alerts(now=noon + 3).crossed == 24
    with django_assert_num_queries(3):
        assert check_quota_alerts(now=noon + 4).crossed == 0
    assert len(mailoutbox) == 2 + 2 + 10


def test_batches_cover_every_user(monkeypatch: pytest.MonkeyPatch, mailoutbox: list[Any]) -> None:
    monkeypatch.setattr(alerts, "BATCH_USERS", 2)
    noon = noon_today()
    people = [person(f"b{i}", tokens_per_day=1000) for i in range(5)]
    for p in people:
        set_quota_alerts(p.user, actor=p.user, thresholds={DAY: [80]})
        use(p, 900, noon)
    result = check_quota_alerts(now=noon + 1)
    assert (result.users, result.sent) == (5, 5)
    assert sorted(m.to[0] for m in mailoutbox) == sorted(p.user.email for p in people)


# --- Scheduling ---------------------------------------------------------------------------------


def test_the_beat_runs_the_check_every_minute_by_default() -> None:
    entry: dict[str, Any] = settings.CELERY_BEAT_SCHEDULE["check-quota-alerts"]
    assert entry["task"] == "telemetry.tasks.check_quota_alerts"
    assert entry["schedule"] == settings.QUOTA_ALERT_CHECK_SECONDS == 60.0
    assert 0 < entry["options"]["expires"] < entry["schedule"]


@pytest.mark.django_db(transaction=True)
def test_the_quick_starts_embedded_beat_reads_the_in_memory_limiter(
    settings: Any, mailoutbox: list[Any]
) -> None:
    """Without Redis the gateway process runs the beat: the check reads the very MemoryBackend
    the gateway admits with."""
    settings.REDIS_URL = ""
    settings.EMBEDDED_BEAT = True
    ivy = person("ivy", tokens_per_day=1000)
    set_quota_alerts(ivy.user, actor=ivy.user, thresholds={DAY: [80]})
    use(ivy, 900, time.time())  # the process's shared in-memory limiter, as the gateway's
    settings.CELERY_BEAT_SCHEDULE = {
        "alerts": dict(settings.CELERY_BEAT_SCHEDULE["check-quota-alerts"])
    }
    beat = embedded_beat()
    assert isinstance(beat, EmbeddedBeat)
    beat.tick()
    assert beat.runs["alerts"] == 1
    assert [m.to for m in mailoutbox] == [[ivy.user.email]]
