"""`manage.py export_usage`: CSV of the roll-ups or the raw ledger, for Excel and for scripts."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command

from quotas.models import UsageRecord
from telemetry.exports import (
    BOM,
    RAW_HEADER,
    ROLLUP_HEADER,
    ProgressBar,
    csv_lines,
    rollup_export,
)
from telemetry.models import UsageRollup
from telemetry.rollups import PERIODS, roll_up_recent
from tests.telemetry.test_rollups import KIM, LARGE, LEE, NOW, SMALL, add, record


@pytest.fixture(autouse=True)
def english() -> Iterator[None]:
    # The assertions read the command's English messages; Korean is the default language.
    from django.utils import translation

    with translation.override("en"):
        yield


pytestmark = pytest.mark.django_db

DAY_ARGS = ("--since", "2026-11-24", "--until", "2026-11-24")


@pytest.fixture
def ledger() -> list[UsageRecord]:
    kim = User.objects.create(username=KIM)
    lee = User.objects.create(username=LEE)
    rows = add(
        record(kim, SMALL, "01:00:05", 1000, ttft=100, tokens=(100, 50, 20), streamed=True),
        record(kim, SMALL, "01:00:20", 3000, ttft=300, tokens=(200, 80, 0), streamed=True),
        record(kim, "", "01:00:50", 2, status=429, error="tokens"),
        record(kim, "", "01:00:51", 3, status=429, error="requests"),
        record(kim, SMALL, "01:01:10", 500, status=500, error="upstream_error"),
        record(lee, LARGE, "01:00:30", 1500.25, ttft=150, tokens=(120, 60, 0)),
        # 00:00:30 on the 25th in Seoul: outside a day export of the 24th
        record(lee, LARGE, "15:00:30", 700, tokens=(1, 1, 0)),
        # 08:59:59 on the 24th in Seoul is still the 24th; 23:59 UTC on the 23rd
        record(lee, LARGE, "23:59:00", 300, tokens=(5, 5, 0), day=23),
    )
    roll_up_recent(now=NOW.replace(hour=16))
    return rows


def export(tmp_path: Path, *args: str) -> tuple[bytes, list[list[str]], str]:
    target = tmp_path / "usage.csv"
    err = io.StringIO()
    call_command("export_usage", *args, "--output", str(target), stderr=err)
    raw = target.read_bytes()
    return raw, list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""))), err.getvalue()


def test_day_export_has_bom_header_korean_names_and_the_numbers(
    ledger: list[UsageRecord], tmp_path: Path
) -> None:
    raw, rows, err = export(tmp_path, *DAY_ARGS, "--period", "day")
    assert raw.startswith(BOM.encode())  # EF BB BF: Excel reads UTF-8
    assert "김철수".encode() in raw and "이영희".encode() in raw
    assert b"\r\n" in raw  # RFC 4180 line ends, as Excel writes them
    assert tuple(rows[0]) == ROLLUP_HEADER
    cells = {(row[3], row[4]): dict(zip(ROLLUP_HEADER, row, strict=True)) for row in rows[1:]}
    assert set(cells) == {(KIM, SMALL), (KIM, ""), (LEE, LARGE)}
    kim = cells[(KIM, SMALL)]
    assert kim == {
        "period": "day",
        "period_start": "2026-11-24 00:00:00+09:00",
        "user_id": str(User.objects.get(username=KIM).pk),
        "username": KIM,
        "model": SMALL,
        "requests": "3",
        "prompt_tokens": "300",
        "completion_tokens": "130",
        "cached_tokens": "20",
        "total_tokens": "430",
        "errors": "1",
        "errors_by_type": '{"upstream_error":1}',
        "rate_limited": "0",
        "rate_limited_by_limit": "{}",
        # latencies 500, 1000, 3000: nearest rank 2 and 3; TTFT 100, 300: ranks 1 and 2
        "latency_p50_ms": "1000",
        "latency_p95_ms": "3000",
        "ttft_p50_ms": "100",
        "ttft_p95_ms": "300",
    }
    refused = cells[(KIM, "")]
    assert (refused["requests"], refused["rate_limited"]) == ("2", "2")
    assert refused["rate_limited_by_limit"] == '{"requests":1,"tokens":1}'
    assert (refused["ttft_p50_ms"], refused["latency_p50_ms"]) == ("", "2")
    # The 23:59 UTC row of the 23rd is 08:59 on the 24th in Seoul; the 15:00:30 one is the 25th.
    lee = cells[(LEE, LARGE)]
    assert (lee["requests"], lee["total_tokens"], lee["latency_p50_ms"]) == ("2", "190", "300")
    assert "3 rows written" in err


def test_hour_export_and_one_user(ledger: list[UsageRecord], tmp_path: Path) -> None:
    _, rows, _ = export(tmp_path, *DAY_ARGS, "--period", "hour", "--user", LEE)
    assert [(row[1], row[3], row[5]) for row in rows[1:]] == [
        ("2026-11-24 08:00:00+09:00", LEE, "1"),  # 23:00 UTC on the 23rd
        ("2026-11-24 10:00:00+09:00", LEE, "1"),
    ]


def test_raw_export(ledger: list[UsageRecord], tmp_path: Path) -> None:
    UsageRecord.objects.filter(pk=ledger[5].pk).update(upstream="http://sglang-2:8000")
    raw, rows, err = export(tmp_path, *DAY_ARGS, "--period", "raw")
    assert raw.startswith(BOM.encode())
    assert tuple(rows[0]) == RAW_HEADER
    assert len(rows) == 1 + 7  # the row of 00:00:30 on the 25th (Seoul) is not in the 24th
    first = dict(zip(RAW_HEADER, rows[1], strict=True))
    assert first["username"] == LEE and first["started_at"] == "2026-11-24 08:59:00.000+09:00"
    by_id = {row[0]: dict(zip(RAW_HEADER, row, strict=True)) for row in rows[1:]}
    lee = by_id[ledger[5].request_id]
    assert lee["started_at"] == "2026-11-24 10:00:30.000+09:00"
    assert lee["finished_at"] == "2026-11-24 10:00:31.500+09:00"
    assert (lee["latency_ms"], lee["model"], lee["status_code"]) == ("1500.25", LARGE, "200")
    assert (lee["prompt_tokens"], lee["completion_tokens"], lee["streamed"]) == (
        "120",
        "60",
        "false",
    )
    limited = by_id[ledger[2].request_id]
    assert (limited["username"], limited["status_code"], limited["error_type"]) == (
        KIM,
        "429",
        "tokens",
    )
    assert limited["time_to_first_token_ms"] == ""
    assert (lee["upstream"], limited["upstream"]) == ("http://sglang-2:8000", "")
    assert "7 rows written" in err


def test_export_to_stdout(ledger: list[UsageRecord]) -> None:
    out, err = io.StringIO(), io.StringIO()
    call_command("export_usage", *DAY_ARGS, stdout=out, stderr=err)
    text = out.getvalue()
    assert text.startswith(BOM + ",".join(ROLLUP_HEADER) + "\r\n")
    assert text.count("\r\n") == 1 + 3
    assert KIM in text and "rows written" not in text  # messages go to stderr only
    assert "3 rows written" in err.getvalue()


def test_export_streams_in_a_constant_number_of_queries(
    tmp_path: Path, django_assert_max_num_queries: Any
) -> None:
    kim = User.objects.create(username=KIM)
    add(*(record(kim, SMALL, f"01:{i % 60:02d}:{i % 59:02d}", 10 + i) for i in range(3000)))
    with django_assert_max_num_queries(3):  # the user, the count, one cursor for the rows
        _, rows, _ = export(tmp_path, *DAY_ARGS, "--period", "raw", "--user", KIM)
    assert len(rows) == 3001


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "2026-13-01", "--until", "2026-11-24"), "YYYY-MM-DD"),
        (("--since", "2026/11/24", "--until", "2026-11-24"), "YYYY-MM-DD"),
        (("--since", "2026-11-25", "--until", "2026-11-24"), "is before --since"),
        ((*DAY_ARGS, "--user", "없는사람"), "no user named"),
        ((*DAY_ARGS, "--period", "week"), "invalid choice"),
        (("--until", "2026-11-24"), "--since"),
        ((*DAY_ARGS, "--output", "/nonexistent-dir/usage.csv"), "Cannot write"),
    ],
)
def test_bad_arguments_are_command_errors(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("export_usage", *args, stdout=io.StringIO(), stderr=io.StringIO())


def test_a_failed_export_leaves_no_file(
    ledger: list[UsageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: Any, **kwargs: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("telemetry.management.commands.export_usage.write_csv", full_disk)
    with pytest.raises(CommandError, match="No space left"):
        export(tmp_path, *DAY_ARGS)
    assert list(tmp_path.iterdir()) == []


def test_admin_selection_export(ledger: list[UsageRecord]) -> None:
    chosen = UsageRollup.objects.filter(period="minute", user__username=KIM)
    text = "".join(csv_lines(rollup_export(chosen)))
    rows = list(csv.reader(io.StringIO(text.removeprefix(BOM))))
    assert tuple(rows[0]) == ROLLUP_HEADER
    assert [(row[1], row[4], row[5]) for row in rows[1:]] == [
        ("2026-11-24 10:00:00+09:00", "", "2"),
        ("2026-11-24 10:00:00+09:00", SMALL, "2"),
        ("2026-11-24 10:01:00+09:00", SMALL, "1"),
    ]
    # The watermark row is no roll-up and never exported.
    everything = "".join(csv_lines(rollup_export(UsageRollup.objects.all())))
    assert "watermark" not in everything
    assert everything.count("\r\n") == 1 + UsageRollup.objects.filter(period__in=PERIODS).count()


def test_progress_bar() -> None:
    written: list[str] = []
    ticks = iter([0.0, 0.1, 0.3, 0.35])
    bar = ProgressBar(written.append, 200, width=10, interval=0.2, clock=lambda: next(ticks))
    bar.update(50)  # drawn (first)
    bar.update(100)  # 0.1 s later: skipped
    bar.update(150)  # 0.3 s: drawn
    bar.update(160)  # skipped
    bar.finish()
    assert written == [
        "\r  25% [##--------] 50/200",
        "\r  75% [#######---] 150/200",
        "\r  80% [########--] 160/200\n",
    ]
    quiet: list[str] = []
    log = ProgressBar(quiet.append, 0, interactive=False, width=4)
    log.update(0)
    log.finish()
    assert quiet == [" 100% [####] 0/0\n"]


def test_the_day_range_is_in_seoul(ledger: list[UsageRecord], tmp_path: Path) -> None:
    _, rows, _ = export(
        tmp_path, "--since", "2026-11-25", "--until", "2026-11-25", "--period", "raw"
    )
    assert [row[1] for row in rows[1:]] == ["2026-11-25 00:00:30.000+09:00"]
