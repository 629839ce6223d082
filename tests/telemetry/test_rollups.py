"""Usage roll-ups against a hand-computed table; late rows, idempotence, the Seoul day boundary.

Every expected number below was worked out by hand from the ledger rows in `ledger` (see the
comments there); percentiles are nearest-rank: sorted(values)[ceil(p/100 × n) − 1].
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import User
from django.db import connection, transaction

from quotas.models import UsageRecord
from telemetry import rollups
from telemetry.models import UsageRollup
from telemetry.rollups import (
    PERIODS,
    Watermark,
    get_watermark,
    nearest_rank,
    period_after,
    period_floor,
    prune_ledger,
    roll_up,
    roll_up_recent,
)

pytestmark = pytest.mark.django_db

SEOUL = ZoneInfo("Asia/Seoul")
SMALL = "Qwen/Qwen2.5-7B-Instruct"
LARGE = "Qwen/Qwen2.5-32B-Instruct"
KIM, LEE = "김철수", "이영희"
DAY = datetime(2026, 11, 24, tzinfo=SEOUL)  # 2026-11-23 15:00 UTC
NOW = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)  # an hour after the last row


def utc(clock: str, day: int = 24) -> datetime:
    """`"01:00:05.5"` on 2026-11-<day> in UTC."""
    hours, minutes, *rest = clock.split(":")
    seconds = float(rest[0]) if rest else 0.0
    return datetime(2026, 11, day, int(hours), int(minutes), tzinfo=UTC) + timedelta(
        seconds=seconds
    )


def record(
    user: User | None,
    model: str,
    at: str,
    ms: float,
    *,
    status: int = 200,
    error: str = "",
    ttft: float | None = None,
    tokens: tuple[int, int, int] = (0, 0, 0),
    streamed: bool = False,
    disconnected: bool = False,
    day: int = 24,
) -> UsageRecord:
    started = utc(at, day)
    prompt, completion, cached = tokens
    return UsageRecord(
        request_id=uuid.uuid4().hex,
        user=user,
        model=model,
        endpoint="chat/completions" if model else "",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        estimated_prompt_tokens=prompt,
        usage_source="upstream" if prompt else "none",
        status_code=status,
        error_type=error,
        streamed=streamed,
        client_disconnected=disconnected,
        started_at=started,
        finished_at=started + timedelta(milliseconds=ms),
        time_to_first_token_ms=ttft,
    )


def add(*records: UsageRecord) -> list[UsageRecord]:
    return UsageRecord.objects.bulk_create(records)


@pytest.fixture
def users() -> dict[str, User]:
    return {name: User.objects.create(username=name) for name in (KIM, LEE)}


@pytest.fixture
def ledger(users: dict[str, User]) -> list[UsageRecord]:
    kim, lee = users[KIM], users[LEE]
    rows = [
        # kim, 7B, minute 01:00: latencies 1000, 3000, 2000; TTFT 100, 300 (one null)
        record(kim, SMALL, "01:00:05", 1000, ttft=100, tokens=(100, 50, 20), streamed=True),
        record(kim, SMALL, "01:00:20", 3000, ttft=300, tokens=(200, 80, 0), streamed=True),
        record(kim, SMALL, "01:00:40", 2000, tokens=(50, 30, 10)),
        # kim refused (the gateway writes refusals with model ""): 429s of two kinds
        record(kim, "", "01:00:50", 2, status=429, error="tokens"),
        record(kim, "", "01:00:51", 3, status=429, error="tokens"),
        record(kim, "", "01:00:52", 1, status=429, error="requests"),
        # kim, 7B, minute 01:01: an upstream failure, nothing billed
        record(kim, SMALL, "01:01:10", 500, status=500, error="upstream_error"),
        # kim, 32B, minute 01:01
        record(kim, LARGE, "01:01:30", 4000, ttft=400, tokens=(300, 100, 100), streamed=True),
        # lee, 7B, minute 01:00, then two in hour 02:00 (one a client disconnect: 499, no type)
        record(lee, SMALL, "01:00:30", 1500, ttft=150, tokens=(120, 60, 0), streamed=True),
        record(lee, "", "01:00:45", 4, status=429, error="tokens_per_day"),
        record(lee, SMALL, "02:00:10", 2500, tokens=(80, 40, 0)),
        record(
            lee,
            SMALL,
            "02:00:40",
            800,
            status=499,
            ttft=200,
            tokens=(50, 10, 0),
            streamed=True,
            disconnected=True,
        ),
    ]
    # lee, 32B, minute 01:02: 20 requests, latencies 100…2000 ms, TTFT 10…200 ms. Nearest
    # rank: p50 = 10th value (1000 / 100), p95 = 19th (1900 / 190); interpolation would give
    # 1050 and 1905.
    rows += [
        record(
            lee,
            LARGE,
            f"01:02:{i:02d}",
            (i + 1) * 100,
            ttft=(i + 1) * 10,
            tokens=(10, 5, 0),
            streamed=True,
        )
        for i in range(20)
    ]
    return add(*rows)


# (period, start, user, model): requests, prompt, completion, cached, errors, 429s,
#                               latency p50, p95, TTFT p50, p95
Row = tuple[int, int, int, int, dict[str, int], dict[str, int], Any, Any, Any, Any]
LIMITED_KIM = {"tokens": 2, "requests": 1}
UPSTREAM = {"upstream_error": 1}
GONE = {"http_499": 1}  # a client disconnect: 499 without an error type
DAILY = {"tokens_per_day": 1}
EXPECTED: dict[tuple[str, datetime, str, str], Row] = {
    # --- minutes (UTC) ---
    ("minute", utc("01:00"), KIM, SMALL): (3, 350, 160, 30, {}, {}, 2000, 3000, 100, 300),
    ("minute", utc("01:00"), KIM, ""): (3, 0, 0, 0, {}, LIMITED_KIM, 2, 3, None, None),
    ("minute", utc("01:01"), KIM, SMALL): (1, 0, 0, 0, UPSTREAM, {}, 500, 500, None, None),
    ("minute", utc("01:01"), KIM, LARGE): (1, 300, 100, 100, {}, {}, 4000, 4000, 400, 400),
    ("minute", utc("01:00"), LEE, SMALL): (1, 120, 60, 0, {}, {}, 1500, 1500, 150, 150),
    ("minute", utc("01:00"), LEE, ""): (1, 0, 0, 0, {}, DAILY, 4, 4, None, None),
    # latencies 2500, 800 → sorted 800, 2500: p50 rank 1, p95 rank 2
    ("minute", utc("02:00"), LEE, SMALL): (2, 130, 50, 0, GONE, {}, 800, 2500, 200, 200),
    ("minute", utc("01:02"), LEE, LARGE): (20, 200, 100, 0, {}, {}, 1000, 1900, 100, 190),
    # --- hours (UTC) ---
    # latencies 500, 1000, 2000, 3000: p50 rank 2, p95 rank 4
    ("hour", utc("01:00"), KIM, SMALL): (4, 350, 160, 30, UPSTREAM, {}, 1000, 3000, 100, 300),
    ("hour", utc("01:00"), KIM, ""): (3, 0, 0, 0, {}, LIMITED_KIM, 2, 3, None, None),
    ("hour", utc("01:00"), KIM, LARGE): (1, 300, 100, 100, {}, {}, 4000, 4000, 400, 400),
    ("hour", utc("01:00"), LEE, SMALL): (1, 120, 60, 0, {}, {}, 1500, 1500, 150, 150),
    ("hour", utc("01:00"), LEE, ""): (1, 0, 0, 0, {}, DAILY, 4, 4, None, None),
    ("hour", utc("02:00"), LEE, SMALL): (2, 130, 50, 0, GONE, {}, 800, 2500, 200, 200),
    ("hour", utc("01:00"), LEE, LARGE): (20, 200, 100, 0, {}, {}, 1000, 1900, 100, 190),
    # --- days (local midnight in Seoul) ---
    ("day", DAY, KIM, SMALL): (4, 350, 160, 30, UPSTREAM, {}, 1000, 3000, 100, 300),
    ("day", DAY, KIM, ""): (3, 0, 0, 0, {}, LIMITED_KIM, 2, 3, None, None),
    ("day", DAY, KIM, LARGE): (1, 300, 100, 100, {}, {}, 4000, 4000, 400, 400),
    # latencies 1500, 2500, 800 → 800, 1500, 2500: p50 rank 2, p95 rank 3; TTFT 150, 200
    ("day", DAY, LEE, SMALL): (3, 250, 110, 0, GONE, {}, 1500, 2500, 150, 200),
    ("day", DAY, LEE, ""): (1, 0, 0, 0, {}, DAILY, 4, 4, None, None),
    ("day", DAY, LEE, LARGE): (20, 200, 100, 0, {}, {}, 1000, 1900, 100, 190),
}


def table() -> dict[tuple[str, datetime, str, str], Row]:
    """Every roll-up cell, in the shape of EXPECTED (updated_at left out)."""
    cells = UsageRollup.objects.filter(period__in=PERIODS).select_related("user")
    return {
        (cell.period, cell.period_start, cell.user.username if cell.user else "", cell.model): (
            cell.requests,
            cell.prompt_tokens,
            cell.completion_tokens,
            cell.cached_tokens,
            cell.errors,
            cell.rate_limited,
            cell.latency_p50_ms,
            cell.latency_p95_ms,
            cell.ttft_p50_ms,
            cell.ttft_p95_ms,
        )
        for cell in cells
    }


def roll_up_everything() -> dict[str, int]:
    return {period: roll_up(period, utc("00:00"), utc("03:00")) for period in PERIODS}


# --- Percentiles and periods --------------------------------------------------------------------


def test_nearest_rank_percentiles() -> None:
    assert nearest_rank([], 50) is None
    assert nearest_rank([7.0], 50) == nearest_rank([7.0], 95) == 7.0
    assert nearest_rank([1000, 3000, 2000], 50) == 2000
    assert nearest_rank([1000, 3000, 2000], 95) == 3000
    assert nearest_rank([500, 1000, 2000, 3000], 50) == 1000  # rank ceil(2.0) = 2
    values = [float(v) for v in range(100, 2001, 100)]
    assert (nearest_rank(values, 50), nearest_rank(values, 95)) == (1000, 1900)
    assert nearest_rank(list(range(1, 101)), 95) == 95
    with pytest.raises(ValueError):
        nearest_rank([1.0], 0)


def test_periods_start_on_utc_minutes_and_hours_and_on_seoul_midnight() -> None:
    moment = utc("14:59:30.25")  # 23:59:30 in Seoul
    assert period_floor("minute", moment) == utc("14:59")
    assert period_floor("hour", moment) == utc("14:00")
    assert period_floor("day", moment) == datetime(2026, 11, 24, tzinfo=SEOUL)
    assert period_after("day", period_floor("day", moment)) == utc("15:00")
    assert period_floor("day", utc("15:00:30")) == utc("15:00")


# --- The table ----------------------------------------------------------------------------------


def test_roll_up_matches_the_hand_computed_table(ledger: list[UsageRecord]) -> None:
    written = roll_up_everything()
    assert written == {"minute": 8, "hour": 7, "day": 6}
    assert table() == EXPECTED


def test_roll_up_is_idempotent_and_only_touches_its_range(ledger: list[UsageRecord]) -> None:
    roll_up_everything()
    first = table()
    roll_up_everything()
    assert table() == first
    UsageRollup.objects.all().delete()
    # [01:00:30, 01:01:10) intersects the minutes 01:00 and 01:01 only.
    assert roll_up("minute", utc("01:00:30"), utc("01:01:10")) == 4 + 2
    assert {key[1] for key in table()} == {utc("01:00"), utc("01:01")}


def test_roll_up_takes_a_constant_number_of_queries(
    users: dict[str, User], django_assert_max_num_queries: Any
) -> None:
    # 600 rows in 40 minute cells: 3 reads, the top id, at most a few upsert batches.
    add(
        *(
            record(users[KIM if i % 2 else LEE], SMALL, f"01:{i % 40:02d}:{i % 60:02d}", 100 + i,
                   ttft=10 + i % 7, tokens=(i, 1, 0))
            for i in range(600)
        )
    )  # fmt: skip
    with django_assert_max_num_queries(8):
        assert roll_up("minute", utc("01:00"), utc("02:00")) == 40
    with django_assert_max_num_queries(8):
        assert roll_up("day", utc("01:00"), utc("02:00")) == 2


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="period"):
        roll_up("week", utc("01:00"), utc("02:00"))
    with pytest.raises(ValueError, match="aware"):
        roll_up("hour", datetime(2026, 11, 24), utc("02:00"))
    with pytest.raises(ValueError, match="before"):
        roll_up("hour", utc("02:00"), utc("01:00"))


# --- Late rows ----------------------------------------------------------------------------------

LATE_CHANGES: dict[tuple[str, datetime, str, str], Row] = {
    # latencies 1000, 2000, 3000, 5000: p50 rank 2, p95 rank 4; TTFT 50, 100, 300: ranks 2, 3
    ("minute", utc("01:00"), KIM, SMALL): (4, 360, 165, 30, {}, {}, 2000, 5000, 100, 300),
    # latencies 500, 1000, 2000, 3000, 5000: p50 rank 3, p95 rank 5
    ("hour", utc("01:00"), KIM, SMALL): (5, 360, 165, 30, UPSTREAM, {}, 2000, 5000, 100, 300),
    ("day", DAY, KIM, SMALL): (5, 360, 165, 30, UPSTREAM, {}, 2000, 5000, 100, 300),
}


def test_a_late_row_recomputes_its_minute_hour_and_day(
    ledger: list[UsageRecord], users: dict[str, User], django_assert_max_num_queries: Any
) -> None:
    first = roll_up_recent(now=NOW)
    assert first["new_rows"] == len(ledger) and first["caught_up"]
    assert first["cells"] == {"minute": 8, "hour": 7, "day": 6}
    assert table() == EXPECTED

    # A batch written an hour late (e.g. after a worker outage): a minute long rolled up.
    add(record(users[KIM], SMALL, "01:00:55", 5000, ttft=50, tokens=(10, 5, 0)))
    with django_assert_max_num_queries(20):
        second = roll_up_recent(now=NOW + timedelta(minutes=1))
    assert second["new_rows"] == 1
    assert table() == {**EXPECTED, **LATE_CHANGES}

    again = roll_up_recent(now=NOW + timedelta(minutes=2))
    assert again["new_rows"] == 0
    assert table() == {**EXPECTED, **LATE_CHANGES}
    for period in PERIODS:
        roll_up(period, utc("00:00"), utc("03:00"))
    assert table() == {**EXPECTED, **LATE_CHANGES}


def test_a_run_recomputes_only_the_users_and_periods_it_must(
    ledger: list[UsageRecord], users: dict[str, User]
) -> None:
    roll_up_recent(now=NOW)
    later = NOW + timedelta(seconds=rollups.LATE_COMMIT_SECONDS + 60)
    assert roll_up_recent(now=later)["cells"] == {"minute": 0, "hour": 0, "day": 0}
    add(record(users[LEE], LARGE, "02:30:00", 700, ttft=70, tokens=(1, 1, 0)))
    # lee's new minute; lee's hour 02:00 (7B, 32B); lee's day (7B, 32B, refused ""). kim: none.
    report = roll_up_recent(now=later + timedelta(minutes=1))
    assert report["cells"] == {"minute": 1, "hour": 2, "day": 3}
    assert table()[("day", DAY, LEE, LARGE)][0] == 21


def test_ids_committed_out_of_order_are_read_again(
    ledger: list[UsageRecord], users: dict[str, User]
) -> None:
    """On PostgreSQL a transaction holding lower ids can commit after a run saw higher ones."""
    roll_up_recent(now=NOW - timedelta(minutes=10))  # an earlier run: the usual state
    in_flight, committed = add(
        record(users[KIM], LARGE, "01:30:00", 1000, tokens=(1, 1, 0)),
        record(users[KIM], LARGE, "01:31:00", 1000, tokens=(1, 1, 0)),
    )
    UsageRecord.objects.filter(pk=in_flight.pk).delete()  # not committed yet…
    roll_up_recent(now=NOW)
    assert get_watermark().rolled_up_to == committed.pk
    assert ("minute", utc("01:30"), KIM, LARGE) not in table()
    in_flight.save(force_insert=True)  # …committed now, below the watermark
    roll_up_recent(now=NOW + timedelta(minutes=1))
    assert table()[("minute", utc("01:30"), KIM, LARGE)][0] == 1
    assert table()[("day", DAY, KIM, LARGE)][0] == 3


def test_a_backlog_is_worked_off_in_bounded_runs(
    ledger: list[UsageRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollups, "MAX_ROWS_PER_RUN", 10)
    reports = [roll_up_recent(now=NOW + timedelta(minutes=i)) for i in range(4)]
    assert [r["new_rows"] for r in reports] == [10, 10, 10, 2]
    assert [r["caught_up"] for r in reports] == [False, False, False, True]
    assert table() == EXPECTED


def test_the_watermark_keeps_the_runs_of_the_re_read_window() -> None:
    start = NOW
    mark = Watermark()
    for minute, top in enumerate([10, 20, 30, 40, 50, 60, 70, 80]):
        mark = mark.advanced(start + timedelta(minutes=minute), top)
    # At 7 min the horizon is 2 min: the run at 2 min (top 30) is the next floor.
    assert mark.rolled_up_to == 80
    assert mark.rescan_floor(start + timedelta(minutes=7)) == 30
    assert mark.runs[0][1] == 30
    assert Watermark.from_json(mark.as_json()) == mark
    assert Watermark.from_json({}) == Watermark()
    with transaction.atomic():
        assert get_watermark() == Watermark()


def test_the_watermark_lives_in_its_own_table(ledger: list[UsageRecord]) -> None:
    from telemetry.models import RollupCursor

    roll_up_recent(now=NOW)
    assert UsageRollup.objects.filter(period__in=PERIODS).count() == len(EXPECTED)
    assert not UsageRollup.objects.exclude(period__in=PERIODS).exists()
    cursor = RollupCursor.objects.get(name="usage_rollups")
    assert cursor.state["rolled_up_to"] == max(row.pk for row in ledger)


@pytest.mark.django_db(transaction=True)
def test_concurrent_runs_wait_for_each_other(users: dict[str, User]) -> None:
    """The watermark is locked for a whole run (FOR UPDATE on PostgreSQL, SQLite's write
    lock), so two workers never roll up the same rows at once or lose a watermark update."""
    roll_up_recent(now=NOW - timedelta(minutes=10))  # the watermark row exists, committed
    add(record(users[KIM], SMALL, "01:00:00", 100))
    locked, release, done = threading.Event(), threading.Event(), threading.Event()
    report: dict[str, Any] = {}

    def holder() -> None:
        try:
            with transaction.atomic():
                get_watermark()
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    def runner() -> None:
        try:
            report.update(roll_up_recent(now=NOW))
            done.set()
        finally:
            connection.close()

    first = threading.Thread(target=holder)
    first.start()
    assert locked.wait(10)
    second = threading.Thread(target=runner)
    second.start()
    try:
        assert not done.wait(0.5), "the second run did not wait for the lock"
    finally:
        release.set()
        first.join(10)
        second.join(10)
    assert done.is_set() and report["new_rows"] == 1
    assert table()[("day", DAY, KIM, SMALL)][0] == 1


# --- The day boundary in Seoul ------------------------------------------------------------------


def test_seoul_midnight_splits_days_at_a_utc_hour_boundary(users: dict[str, User]) -> None:
    kim = users[KIM]
    add(
        record(kim, SMALL, "14:59:30", 1000, tokens=(10, 1, 0)),  # 23:59:30 on the 24th in Seoul
        record(kim, SMALL, "15:00:30", 2000, tokens=(20, 2, 0)),  # 00:00:30 on the 25th
    )
    for period in PERIODS:
        roll_up(period, utc("14:00"), utc("16:00"))
    cells = {(p, start): row[:2] for (p, start, _user, _model), row in table().items()}
    next_day = datetime(2026, 11, 25, tzinfo=SEOUL)
    assert next_day == utc("15:00")
    assert cells == {
        ("minute", utc("14:59")): (1, 10),
        ("minute", utc("15:00")): (1, 20),
        # Seoul is UTC+09:00 with no DST: local midnight is a UTC hour boundary, so the two rows
        # fall in different UTC hours too, and each hour lies inside one local day.
        ("hour", utc("14:00")): (1, 10),
        ("hour", utc("15:00")): (1, 20),
        ("day", DAY): (1, 10),
        ("day", next_day): (1, 20),
    }


def test_days_follow_limiter_time_zone_not_time_zone(users: dict[str, User], settings: Any) -> None:
    settings.LIMITER_TIME_ZONE = "UTC"  # TIME_ZONE stays Asia/Seoul
    add(
        record(users[KIM], SMALL, "14:59:30", 1000, tokens=(10, 1, 0)),
        record(users[KIM], SMALL, "15:00:30", 2000, tokens=(20, 2, 0)),
    )
    assert roll_up("day", utc("14:00"), utc("16:00")) == 1
    assert [key[1] for key in table()] == [utc("00:00")]


# --- Retention ----------------------------------------------------------------------------------


def test_prune_deletes_old_rolled_up_rows_and_keeps_the_roll_ups(
    ledger: list[UsageRecord], users: dict[str, User]
) -> None:
    roll_up_recent(now=NOW)
    not_rolled_up = add(record(users[KIM], SMALL, "01:05:00", 100))[0]
    # 90 days after the 24th (local) the 24th is still kept; one day later it goes.
    assert prune_ledger(now=NOW + timedelta(days=90)) == 0
    deleted = prune_ledger(now=NOW + timedelta(days=91))
    assert deleted == len(ledger)
    assert list(UsageRecord.objects.values_list("pk", flat=True)) == [not_rolled_up.pk]
    assert table() == EXPECTED
