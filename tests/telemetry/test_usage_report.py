"""Usage reports (telemetry/usage.py): roll-up cells + the not rolled-up ledger tail, exactly once.

Expected numbers are either written out by hand or computed by `oracle`, which sums the ledger
rows in Python with rollups.period_floor, without the roll-ups or any SQL aggregation.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections import defaultdict
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import User
from django.utils import translation

from quotas.models import UsageRecord
from telemetry import usage
from telemetry.models import UsageRollup
from telemetry.rollups import (
    LATE_COMMIT_SECONDS,
    PERIODS,
    get_watermark,
    period_floor,
    roll_up,
    roll_up_recent,
)
from telemetry.usage import (
    MAX_BUCKETS,
    TopUser,
    UsageBucket,
    UsageReport,
    UsageTotals,
    top_users,
    usage_csv_rows,
    usage_report,
)

pytestmark = pytest.mark.django_db

SEOUL = ZoneInfo("Asia/Seoul")
SMALL = "Qwen/Qwen2.5-7B-Instruct"
LARGE = "Qwen/Qwen2.5-32B-Instruct"
KEY_A, KEY_B, KEY_LEE = 101, 102, 201
NOW = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)


def utc(clock: str, day: int = 24) -> datetime:
    """`"01:00:05"` on 2026-11-<day>, UTC."""
    hours, minutes, *rest = clock.split(":")
    return datetime(
        2026, 11, day, int(hours), int(minutes), int(rest[0]) if rest else 0, tzinfo=UTC
    )


def record(
    user: User | None,
    model: str,
    at: datetime,
    *,
    tokens: tuple[int, int, int] = (0, 0, 0),
    status: int = 200,
    error: str = "",
    key: int | None = KEY_A,
) -> UsageRecord:
    prompt, completion, cached = tokens
    return UsageRecord(
        request_id=uuid.uuid4().hex,
        user=user,
        api_key_id=key,
        model=model,
        endpoint="chat/completions" if model else "",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        status_code=status,
        error_type=error,
        started_at=at,
        finished_at=at + timedelta(milliseconds=500),
    )


def add(*rows: UsageRecord) -> list[UsageRecord]:
    return UsageRecord.objects.bulk_create(rows)


def refused(user: User, at: datetime, kind: str = "tokens", key: int | None = KEY_A) -> UsageRecord:
    # The gateway writes refusals with model "" and the limit kind as error type.
    return record(user, "", at, status=429, error=kind, key=key)


@pytest.fixture(autouse=True)
def english() -> Any:
    """The refusals below are matched by their English words (Korean is the default)."""
    with translation.override("en"):
        yield


@pytest.fixture
def kim() -> User:
    return User.objects.create(username="김철수")


@pytest.fixture
def lee() -> User:
    return User.objects.create(username="이영희")


@pytest.fixture
def ledger(kim: User, lee: User) -> list[UsageRecord]:
    return add(
        record(kim, SMALL, utc("01:00:05"), tokens=(100, 50, 20)),
        record(kim, SMALL, utc("01:00:40"), tokens=(50, 30, 10), key=KEY_B),
        record(kim, LARGE, utc("01:01:30"), tokens=(300, 100, 100)),
        record(kim, SMALL, utc("01:01:10"), status=500, error="upstream_error"),
        refused(kim, utc("01:00:50")),
        refused(kim, utc("01:00:51"), "requests"),
        record(kim, SMALL, utc("02:30:00"), tokens=(7, 3, 0), status=499),  # a disconnect
        record(lee, SMALL, utc("01:00:30"), tokens=(120, 60, 0), key=KEY_LEE),
        refused(lee, utc("01:00:45"), "tokens_per_day", key=KEY_LEE),
        record(lee, LARGE, utc("02:00:10"), tokens=(80, 40, 0), key=KEY_LEE),
    )


def oracle(
    period: str,
    start: datetime,
    end: datetime,
    *,
    user: User | None = None,
    model: str | None = None,
    key: int | None = None,
) -> dict[datetime, UsageTotals]:
    """Every ledger row, bucketed and summed in Python."""
    sums: dict[datetime, list[int]] = defaultdict(lambda: [0] * 6)
    for row in UsageRecord.objects.all():
        if not start <= row.started_at < end:
            continue
        if (user is not None and row.user_id != user.pk) or (
            model is not None and row.model != model
        ):
            continue
        if key is not None and row.api_key_id != key:
            continue
        figures = sums[period_floor(period, row.started_at)]
        figures[0] += 1
        figures[1] += row.prompt_tokens
        figures[2] += row.completion_tokens
        figures[3] += row.cached_tokens
        figures[4] += row.status_code == 429
        figures[5] += row.status_code >= 400 and row.status_code != 429
    return {
        moment: UsageTotals(
            requests=n,
            prompt_tokens=p,
            completion_tokens=c,
            cached_tokens=k,
            rate_limited=r,
            errors=e,
        )
        for moment, (n, p, c, k, r, e) in sums.items()
    }


def series(report: UsageReport) -> dict[datetime, UsageTotals]:
    return {bucket.start: UsageTotals(**figures(bucket)) for bucket in report.series}


def figures(totals: UsageTotals) -> dict[str, int]:
    fields = asdict(totals)
    return {name: fields[name] for name in ("requests", "prompt_tokens", "completion_tokens",
                                            "cached_tokens", "rate_limited", "errors")}  # fmt: skip


def report(user: User | None, period: str = "hour", **kwargs: Any) -> UsageReport:
    kwargs.setdefault("start", utc("00:00"))
    kwargs.setdefault("end", utc("03:00"))
    return usage_report(user_id=user.pk if user else None, period=period, **kwargs)


def tail_size() -> int:
    return UsageRecord.objects.filter(pk__gt=get_watermark().rolled_up_to).count()


# --- Exact totals -------------------------------------------------------------------------------


def test_a_report_adds_up_cells_and_tail_by_hand(
    ledger: list[UsageRecord], kim: User, lee: User
) -> None:
    roll_up_recent(now=NOW)
    # After the run: a new request in a new minute, and a late one in a rolled-up minute.
    add(
        record(kim, SMALL, utc("02:45:00"), tokens=(1000, 1, 0)),
        record(kim, LARGE, utc("01:01:59"), tokens=(5, 5, 0)),
    )
    assert tail_size() == 2
    got = report(kim)
    assert got.source == "rollups" and got.ledger_kept_since is None
    assert (got.start, got.end) == (utc("00:00"), utc("03:00"))
    assert series(got) == {
        # 01:00 — 7B: 150/80/30; 32B: 300/100/100 + late 5/5; 500; two 429s
        utc("01:00"): UsageTotals(requests=7, prompt_tokens=455, completion_tokens=185,
                                  cached_tokens=130, rate_limited=2, errors=1),
        # 02:00 — the 499 (7/3) and the new row (1000/1)
        utc("02:00"): UsageTotals(requests=2, prompt_tokens=1007, completion_tokens=4,
                                  cached_tokens=0, rate_limited=0, errors=1),
    }  # fmt: skip
    assert got.totals == UsageTotals(
        requests=9, prompt_tokens=1462, completion_tokens=189, cached_tokens=130,
        rate_limited=2, errors=2,
    )  # fmt: skip
    assert got.totals.total_tokens == 1651
    assert [(name, t.requests, t.total_tokens) for name, t in got.by_model] == [
        (SMALL, 5, 1241),
        (LARGE, 2, 410),
        ("", 2, 0),
    ]
    assert all(bucket.start.tzinfo == SEOUL for bucket in got.series)


@pytest.mark.parametrize("period", PERIODS)
def test_every_period_matches_the_oracle_before_during_and_after_roll_ups(
    ledger: list[UsageRecord], kim: User, lee: User, period: str
) -> None:
    def check() -> None:
        for who in (kim, lee, None):
            got = report(who, period, start=utc("20:00", day=23), end=utc("06:00"))
            assert series(got) == oracle(period, got.start, got.end, user=who)
            assert got.totals == UsageTotals(**_summed(got.series))

    check()  # the ledger alone
    roll_up_recent(now=NOW)
    add(record(kim, SMALL, utc("02:59:59"), tokens=(9, 9, 9)), refused(lee, utc("01:00:01")))
    assert tail_size() == 2
    check()  # cells and tail
    roll_up_recent(now=NOW + timedelta(minutes=1))
    assert tail_size() == 0
    check()  # cells alone


def _summed(buckets: list[UsageBucket]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for bucket in buckets:
        for name, value in figures(bucket).items():
            total[name] += value
    return total


@pytest.mark.parametrize("rolled_up", [False, True])
def test_the_seoul_day_boundary(kim: User, rolled_up: bool) -> None:
    add(
        record(kim, SMALL, datetime(2026, 11, 24, 23, 59, 59, tzinfo=SEOUL), tokens=(10, 1, 0)),
        record(kim, SMALL, datetime(2026, 11, 25, 0, 0, 0, tzinfo=SEOUL), tokens=(20, 2, 0)),
    )
    if rolled_up:
        roll_up_recent(now=NOW + timedelta(hours=12))
        assert tail_size() == 0
    # Two hours around the boundary; day reports floor and ceil them to whole Seoul days.
    start = datetime(2026, 11, 24, 23, 0, tzinfo=SEOUL)
    end = datetime(2026, 11, 25, 1, 0, tzinfo=SEOUL)
    tokens = {
        period: {b.start: b.prompt_tokens for b in report(kim, period, start=start, end=end).series}
        for period in PERIODS
    }
    assert tokens == {
        "minute": {utc("14:59"): 10, utc("15:00"): 20},
        "hour": {utc("14:00"): 10, utc("15:00"): 20},
        "day": {datetime(2026, 11, 24, tzinfo=SEOUL): 10, datetime(2026, 11, 25, tzinfo=SEOUL): 20},
    }
    day = report(kim, "day", start=start, end=end)
    assert [b.start.isoformat() for b in day.series] == [
        "2026-11-24T00:00:00+09:00",
        "2026-11-25T00:00:00+09:00",
    ]


def test_start_is_floored_and_end_ceiled_to_the_period(
    ledger: list[UsageRecord], kim: User
) -> None:
    got = report(kim, "minute", start=utc("01:00:30"), end=utc("01:01:00"))
    assert (got.start, got.end) == (utc("01:00"), utc("01:01"))
    assert got.totals.requests == 4  # the whole minute 01:00, also the row at 01:00:05
    day = report(kim, "day", start=utc("00:00"), end=utc("01:00"))
    assert (day.start, day.end) == (
        datetime(2026, 11, 24, tzinfo=SEOUL),
        datetime(2026, 11, 25, tzinfo=SEOUL),
    )
    assert day.start.tzinfo == SEOUL


def test_the_series_is_sparse_and_can_be_filled(ledger: list[UsageRecord], kim: User) -> None:
    got = report(kim, "hour")
    assert [b.start for b in got.series] == [utc("01:00"), utc("02:00")]
    filled = got.filled_series()
    assert [b.start for b in filled] == [utc("00:00"), utc("01:00"), utc("02:00")]
    assert filled[0] == UsageBucket(start=utc("00:00").astimezone(SEOUL))
    assert filled[0].requests == 0 and filled[1:] == got.series


# --- Filters ------------------------------------------------------------------------------------


def test_model_filter_and_the_refusals_model(ledger: list[UsageRecord], kim: User) -> None:
    roll_up_recent(now=NOW)
    add(record(kim, LARGE, utc("01:30:00"), tokens=(1, 1, 0)))
    large = report(kim, model=LARGE)
    assert large.totals == UsageTotals(requests=2, prompt_tokens=301, completion_tokens=101,
                                       cached_tokens=100)  # fmt: skip
    assert [name for name, _ in large.by_model] == [LARGE]
    refusals = report(kim, model="")
    assert refusals.totals == UsageTotals(requests=2, rate_limited=2)
    assert report(kim, model="no-such-model").series == []


def test_an_api_key_report_reads_the_ledger_only(ledger: list[UsageRecord], kim: User) -> None:
    roll_up_recent(now=NOW)
    add(record(kim, SMALL, utc("01:05:00"), tokens=(2, 2, 0), key=KEY_B))
    got = report(kim, "minute", api_key_id=KEY_B)
    assert got.source == "ledger"
    assert got.ledger_kept_since is not None and got.ledger_kept_since.tzinfo == SEOUL
    assert series(got) == {
        utc("01:00"): UsageTotals(
            requests=1, prompt_tokens=50, completion_tokens=30, cached_tokens=10
        ),
        utc("01:05"): UsageTotals(requests=1, prompt_tokens=2, completion_tokens=2),
    }
    for period in PERIODS:
        start, end = report(kim, period).start, report(kim, period).end
        for key in (KEY_A, KEY_B):
            assert series(report(kim, period, api_key_id=key)) == oracle(
                period, start, end, user=kim, key=key
            )
    # Roll-ups have no key: once the ledger is pruned, so is a key's usage (documented); the
    # user's own report still has it.
    roll_up_recent(now=NOW + timedelta(minutes=1))
    UsageRecord.objects.filter(api_key_id=KEY_B).delete()
    assert report(kim, api_key_id=KEY_B).series == []
    assert report(kim).totals.requests == len([r for r in ledger if r.user_id == kim.pk]) + 1


def test_one_users_report_never_holds_anothers_rows(
    ledger: list[UsageRecord], kim: User, lee: User
) -> None:
    def requests(who: User, **kwargs: Any) -> int:
        return sum(report(who, period, **kwargs).totals.requests for period in PERIODS)

    lee_before = requests(lee)
    assert requests(lee) == 3 * 3  # 3 rows, in each of the three periods
    # kim's usage, rolled up and in the tail, never reaches lee's report.
    roll_up_recent(now=NOW)
    add(*(record(kim, SMALL, utc("01:00:00")) for _ in range(5)))
    assert requests(lee) == lee_before
    # lee's key with kim's user id: nothing (a key filter never widens the user filter).
    assert requests(kim, api_key_id=KEY_LEE) == 0
    assert requests(lee, api_key_id=KEY_LEE) == lee_before
    everyone = report(None)
    assert everyone.totals.requests == UsageRecord.objects.count()


# --- Validation ---------------------------------------------------------------------------------


def test_bad_ranges_and_arguments_are_refused(kim: User) -> None:
    with pytest.raises(ValueError, match="period"):
        report(kim, "week")
    with pytest.raises(ValueError, match="before"):
        report(kim, start=utc("02:00"), end=utc("02:00"))
    with pytest.raises(ValueError, match="before"):
        report(kim, start=utc("02:00"), end=utc("01:00"))
    with pytest.raises(ValueError, match="time zone"):
        report(kim, start=datetime(2026, 11, 24), end=utc("01:00"))
    with pytest.raises(ValueError, match="positive id"):
        report(kim, api_key_id=0)
    with pytest.raises(ValueError, match="positive id"):
        usage_report(user_id=2**63, period="hour", start=utc("00:00"), end=utc("01:00"))
    with pytest.raises(ValueError, match="model"):
        report(kim, model="x" * 201)
    last = datetime.max.replace(tzinfo=UTC)
    with pytest.raises(ValueError, match="out of range"):
        report(kim, "day", start=last - timedelta(hours=1), end=last)
    # MAX_BUCKETS buckets are allowed, one more is not (counted after flooring and ceiling).
    start = utc("00:00")
    assert (
        report(kim, "minute", start=start, end=start + timedelta(minutes=MAX_BUCKETS)).series == []
    )
    with pytest.raises(ValueError, match="buckets"):
        report(kim, "minute", start=start, end=start + timedelta(minutes=MAX_BUCKETS, seconds=1))
    with pytest.raises(ValueError, match="buckets"):
        report(kim, "hour", start=start, end=start + timedelta(hours=MAX_BUCKETS + 1))
    days = datetime(2026, 1, 1, tzinfo=SEOUL)
    assert report(kim, "day", start=days, end=days + timedelta(days=MAX_BUCKETS)).series == []
    with pytest.raises(ValueError, match="buckets"):
        report(kim, "day", start=days, end=days + timedelta(days=MAX_BUCKETS, hours=1))


# --- Never twice, never lost --------------------------------------------------------------------


def test_rows_written_after_a_run_count_exactly_once(ledger: list[UsageRecord], kim: User) -> None:
    roll_up_recent(now=NOW)
    before = report(kim).totals.requests
    add(record(kim, SMALL, utc("02:50:00"), tokens=(1, 0, 0)))
    assert report(kim).totals.requests == before + 1
    roll_up_recent(now=NOW + timedelta(minutes=1))
    assert tail_size() == 0
    assert report(kim).totals.requests == before + 1


def test_a_late_row_in_a_rolled_up_minute_counts_once_before_and_after_the_next_run(
    ledger: list[UsageRecord], kim: User
) -> None:
    roll_up_recent(now=NOW)
    # Written an hour late: a minute whose cells exist already.
    late = add(record(kim, SMALL, utc("01:00:55"), tokens=(10, 5, 0)))[0]
    assert late.pk > get_watermark().rolled_up_to
    assert UsageRollup.objects.filter(period="minute", period_start=utc("01:00"), user=kim).exists()
    before = {period: report(kim, period) for period in PERIODS}
    roll_up_recent(now=NOW + timedelta(minutes=1))
    assert tail_size() == 0
    after = {period: report(kim, period) for period in PERIODS}
    assert after == before
    assert before["minute"].series[0].start == utc("01:00")
    assert before["minute"].series[0].requests == 5  # 4 rolled up + the late one
    for period in PERIODS:
        assert series(after[period]) == oracle(
            period, after[period].start, after[period].end, user=kim
        )


def test_a_run_committing_between_the_two_queries_is_not_double_counted(
    ledger: list[UsageRecord], kim: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first query's watermark is only the planner's hint: the tail is cut by the watermark
    read in the same statement as the cells. Here the first read is stale, as if a run had
    committed right after it."""
    expected = {period: report(kim, period) for period in PERIODS}
    roll_up_recent(now=NOW)
    monkeypatch.setattr(usage, "_watermark", lambda: 0)
    for period in PERIODS:
        assert report(kim, period) == expected[period]
    assert top_users(start=utc("00:00"), end=utc("03:00"), by="requests")[0].requests == 7


def test_a_row_committed_behind_the_watermark_shows_after_the_next_run(
    ledger: list[UsageRecord], kim: User
) -> None:
    """On PostgreSQL a transaction holding lower ids can commit after a run read past them: the
    row is in no cell and below the watermark, so it is not counted (never twice), until the
    next run re-reads it (documented)."""
    roll_up_recent(now=NOW - timedelta(minutes=10))
    in_flight, committed = add(
        record(kim, LARGE, utc("01:30:00"), tokens=(1, 1, 0)),
        record(kim, LARGE, utc("01:31:00"), tokens=(1, 1, 0)),
    )
    UsageRecord.objects.filter(pk=in_flight.pk).delete()  # not committed yet…
    roll_up_recent(now=NOW)
    assert get_watermark().rolled_up_to == committed.pk
    before = report(kim, "minute").totals.requests
    in_flight.save(force_insert=True)  # …committed now, below the watermark
    assert report(kim, "minute").totals.requests == before
    roll_up_recent(now=NOW + timedelta(seconds=LATE_COMMIT_SECONDS - 120))
    assert report(kim, "minute").totals.requests == before + 1


def test_a_manual_rebuild_does_not_change_a_report_once_the_watermark_catches_up(
    ledger: list[UsageRecord], kim: User
) -> None:
    roll_up_recent(now=NOW)
    add(record(kim, SMALL, utc("01:10:00"), tokens=(3, 3, 0)))
    expected = report(kim, "hour")
    for period in PERIODS:
        roll_up(period, utc("00:00"), utc("03:00"))
    # Until the next run the rebuilt cells hold a row above the watermark too (documented).
    assert report(kim, "hour").totals.requests == expected.totals.requests + 1
    roll_up_recent(now=NOW + timedelta(minutes=1))
    assert report(kim, "hour") == expected


# --- Query counts -------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [3, 300])
def test_a_constant_number_of_queries(
    kim: User, lee: User, rows: int, django_assert_num_queries: Any
) -> None:
    def spread(n: int, offset: int) -> list[UsageRecord]:
        return [
            record(kim if i % 3 else lee, (SMALL, LARGE, "")[i % 3],
                   utc("00:00") + timedelta(seconds=offset + 37 * i), tokens=(i, 1, 0),
                   status=(200, 429, 500)[i % 3])
            for i in range(n)
        ]  # fmt: skip

    add(*spread(rows, 0))
    roll_up_recent(now=NOW)
    add(*spread(rows, 7))  # the tail, as many rows again
    for period in PERIODS:
        with django_assert_num_queries(2):  # the watermark, then cells UNION ALL tail
            got = report(kim, period, start=utc("00:00"), end=utc("06:00"))
        assert got.totals.requests == sum(1 for i in range(rows) if i % 3) * 2
        with django_assert_num_queries(2):
            report(None, period, start=utc("00:00"), end=utc("06:00"))
        with django_assert_num_queries(1):  # an API key: the ledger alone
            report(kim, period, start=utc("00:00"), end=utc("06:00"), api_key_id=KEY_A)
    with django_assert_num_queries(2):
        top = top_users(start=utc("00:00"), end=utc("06:00"), by="tokens", limit=1000)
    assert sum(user.requests for user in top) == 2 * rows


# --- Top users ----------------------------------------------------------------------------------


@pytest.fixture
def crowd(kim: User, lee: User) -> dict[str, User]:
    park, choi = User.objects.create(username="박민수"), User.objects.create(username="최지우")
    add(
        # kim: most tokens (2 requests)
        record(kim, SMALL, utc("01:00:00"), tokens=(5000, 1000, 0)),
        record(kim, LARGE, utc("01:10:00"), tokens=(1000, 0, 0)),
        # lee: most requests (5), few tokens
        *(record(lee, SMALL, utc(f"01:2{i}:00"), tokens=(10, 10, 0)) for i in range(5)),
        # park: most 429s (3) and one request
        *(refused(park, utc(f"02:0{i}:00")) for i in range(3)),
        record(park, LARGE, utc("02:10:00"), tokens=(200, 0, 0)),
        # choi: one 429, ties with nobody
        refused(choi, utc("02:20:00")),
    )
    return {"kim": kim, "lee": lee, "park": park, "choi": choi}


def names(users: list[TopUser]) -> list[str | None]:
    return [user.username for user in users]


@pytest.mark.parametrize("rolled_up", [False, True])
def test_top_users_by_each_criterion_and_limit(crowd: dict[str, User], rolled_up: bool) -> None:
    if rolled_up:
        roll_up_recent(now=NOW)
        assert tail_size() == 0
    window = {"start": utc("00:00"), "end": utc("03:00")}
    assert names(top_users(**window, by="tokens")) == ["김철수", "박민수", "이영희"]
    assert names(top_users(**window, by="requests")) == ["이영희", "박민수", "김철수", "최지우"]
    assert names(top_users(**window, by="rate_limited")) == ["박민수", "최지우"]
    assert names(top_users(**window, by="requests", limit=2)) == ["이영희", "박민수"]
    kim = top_users(**window, by="tokens", limit=1)[0]
    assert kim == TopUser(
        user_id=crowd["kim"].pk, username="김철수", requests=2, prompt_tokens=6000,
        completion_tokens=1000, cached_tokens=0, rate_limited=0, errors=0,
    )  # fmt: skip
    assert kim.total_tokens == 7000
    assert names(top_users(**window, by="requests", model=LARGE)) == ["김철수", "박민수"]
    assert names(top_users(**window, by="requests", model="")) == ["박민수", "최지우"]


def test_top_users_ties_go_by_user_id_and_deleted_users_keep_their_usage(
    kim: User, lee: User
) -> None:
    add(record(lee, SMALL, utc("01:00:00"), tokens=(5, 5, 0)),
        record(kim, SMALL, utc("01:00:00"), tokens=(5, 5, 0)))  # fmt: skip
    window = {"start": utc("00:00"), "end": utc("03:00")}
    assert names(top_users(**window, by="tokens")) == ["김철수", "이영희"]
    gone = lee.pk
    User.objects.filter(pk=gone).delete()  # the ledger keeps its user_id (no constraint)
    roll_up_recent(now=NOW)
    assert [(u.user_id, u.username) for u in top_users(**window, by="tokens")] == [
        (kim.pk, "김철수"),
        (gone, None),
    ]


def test_top_users_tile_unaligned_ranges_with_days_hours_and_minutes(kim: User) -> None:
    # One row on each side of every boundary the tiling uses, over three Seoul days.
    moments = [
        datetime(2026, 11, 23, 13, 29, 59, tzinfo=SEOUL),  # before the range
        datetime(2026, 11, 23, 13, 30, 0, tzinfo=SEOUL),  # first minute (start 13:30:20 floored)
        datetime(2026, 11, 23, 13, 59, 59, tzinfo=SEOUL),  # minutes before the first hour
        datetime(2026, 11, 23, 14, 0, 0, tzinfo=SEOUL),  # hours before the first midnight
        datetime(2026, 11, 23, 23, 59, 59, tzinfo=SEOUL),
        datetime(2026, 11, 24, 0, 0, 0, tzinfo=SEOUL),  # a whole day
        datetime(2026, 11, 25, 9, 59, 0, tzinfo=SEOUL),  # hours after the last midnight
        datetime(2026, 11, 25, 10, 0, 0, tzinfo=SEOUL),  # minutes after the last hour
        datetime(2026, 11, 25, 10, 14, 59, tzinfo=SEOUL),  # last minute (end 10:14:10 ceiled)
        datetime(2026, 11, 25, 10, 15, 0, tzinfo=SEOUL),  # after the range
    ]
    add(*(record(kim, SMALL, at, tokens=(2**i, 0, 0)) for i, at in enumerate(moments)))
    roll_up_recent(now=datetime(2026, 11, 26, tzinfo=UTC))
    assert tail_size() == 0
    start = datetime(2026, 11, 23, 13, 30, 20, tzinfo=SEOUL)
    end = datetime(2026, 11, 25, 10, 14, 10, tzinfo=SEOUL)
    tiles = usage._tiles(*usage._aligned("minute", start, end))
    assert [(p, a.astimezone(SEOUL).strftime("%d %H:%M"), b.astimezone(SEOUL).strftime("%d %H:%M"))
            for p, a, b in tiles] == [
        ("minute", "23 13:30", "23 14:00"),
        ("hour", "23 14:00", "24 00:00"),
        ("day", "24 00:00", "25 00:00"),
        ("hour", "25 00:00", "25 10:00"),
        ("minute", "25 10:00", "25 10:15"),
    ]  # fmt: skip
    top = top_users(start=start, end=end, by="tokens")
    assert [(u.requests, u.prompt_tokens) for u in top] == [(8, sum(2**i for i in range(1, 9)))]


def test_top_users_refuse_bad_arguments() -> None:
    window = {"start": utc("00:00"), "end": utc("03:00")}
    with pytest.raises(ValueError, match="order"):
        top_users(**window, by="cost")
    for limit in (0, usage.MAX_TOP_USERS + 1):
        with pytest.raises(ValueError, match="limit"):
            top_users(**window, by="tokens", limit=limit)
    with pytest.raises(ValueError, match="before"):
        top_users(start=utc("03:00"), end=utc("03:00"), by="tokens")
    last = datetime.max.replace(tzinfo=UTC)
    with pytest.raises(ValueError, match="out of range"):
        top_users(start=last - timedelta(hours=1), end=last, by="tokens")


# --- CSV ----------------------------------------------------------------------------------------


def test_csv_rows_have_a_header_and_seoul_times(ledger: list[UsageRecord], kim: User) -> None:
    rows = list(usage_csv_rows(report(kim, "hour")))
    assert rows[0] == [
        "period", "start", "requests", "prompt_tokens", "completion_tokens", "cached_tokens",
        "total_tokens", "rate_limited", "errors",
    ]  # fmt: skip
    assert rows[1:] == [
        ["hour", "2026-11-24T10:00:00+09:00", "6", "450", "180", "130", "630", "2", "1"],
        ["hour", "2026-11-24T11:00:00+09:00", "1", "7", "3", "0", "10", "0", "1"],
    ]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(usage_csv_rows(report(kim, "day")))
    assert buffer.getvalue().splitlines()[1].startswith("day,2026-11-24T00:00:00+09:00,7,")
