"""No poison rows: values are fitted to their columns where an event is built and again where
it is written; what still cannot be written is dead-lettered (with the raw event and the
error, replayable from the admin) while the rest of the batch flows on. Both shipping paths
(spool → database, spool → Redis stream → worker), on Postgres here and on SQLite in a
subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from accounts.services import create_api_key, get_or_create_user
from gateway.ledger import LedgerWriter, UsageEvent, event_row
from quotas import ledger_stream
from quotas.models import LedgerDeadLetter, UsageRecord
from tokenlimit import ledger_rows
from tokenlimit.ledger_rows import BIGINT_MAX, INT_MAX, BadRow, clean_row

ROOT = Path(__file__).resolve().parent.parent.parent
LONG_TYPE = "x" * 61
HUGE_TYPE = "오류" * 5000  # 10,000 characters
BEYOND_BIGINT = 2**70


def hostile_events(user_id: int, key_id: int) -> list[UsageEvent]:
    """What an upstream or client could put into an event, one poison per event."""
    now = time.time()

    def event(**fields: Any) -> UsageEvent:
        base: dict[str, Any] = {
            "request_id": uuid.uuid4().hex, "user_id": user_id, "key_id": key_id,
            "model": "m", "endpoint": "chat/completions", "status_code": 502, "streamed": False,
            "started_at": now, "finished_at": now + 0.1,
        }  # fmt: skip
        return UsageEvent(**{**base, **fields})

    return [
        event(error_type=LONG_TYPE),
        event(error_type=HUGE_TYPE),
        event(completion_tokens=BEYOND_BIGINT, prompt_tokens=-5),
        event(model="qwen\x00evil", error_type="nul\x00byte"),
        event(error_type="\ud800lone surrogate", upstream_latency_ms=math.nan),
        event(status_code=70000, ttft_ms=math.inf, usage_source="made-up"),
    ]


def test_values_are_fitted_to_their_columns() -> None:
    row = clean_row(
        ["r" * 100, BEYOND_BIGINT, -1, "m" * 300, "e", BEYOND_BIGINT, -3, "7", 2.9, "??", 99999,
         HUGE_TYPE, 1, 0, math.nan, 1e300, -4.0, math.inf],
        lambda: 1000.0,
    )  # fmt: skip
    assert row[0] == "r" * 64 and row[1] == BIGINT_MAX and row[2] == 0
    assert len(row[3]) == 200 and row[5] == INT_MAX and row[6] == 0 and row[7] == 7
    assert row[8] == 2 and row[9] == "gateway" and row[10] == 2**15 - 1
    assert len(row[11]) == 60 and row[12] is True and row[13] is False
    assert row[15] == ledger_rows.LATEST_EPOCH and row[14] == row[15]  # start falls back to end
    assert row[16] == 0.0 and row[17] is None
    assert clean_row([*row[:11], "a\x00b\ud800", *row[12:]], time.time)[11] == "ab?"


@pytest.mark.parametrize(
    "raw", [["only", "two"], "a string", {"a": "dict"}, 42, [None] * 18, ["", *[0] * 17]]
)
def test_what_is_not_a_row_is_refused(raw: Any) -> None:
    with pytest.raises(BadRow):
        clean_row(raw, time.time)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Callable[[], LedgerWriter]]:
    made: list[LedgerWriter] = []

    def make() -> LedgerWriter:
        made.append(LedgerWriter(flush_seconds=3600, max_pending=10_000, spool_dir=tmp_path))
        return made[-1]

    yield make
    for ledger in made:
        ledger.close()


def spool_poison(ledger: LedgerWriter, good: UsageEvent) -> None:
    """Lines no current gateway writes (an old or broken one might): not JSON, the wrong shape,
    an unfitted row."""
    ledger.start()
    assert ledger._spool is not None
    unfitted = list(event_row(good))
    unfitted[0], unfitted[11] = uuid.uuid4().hex, LONG_TYPE
    for line in ("not json at all", '["wrong", "shape"]', json.dumps(unfitted)):
        ledger._spool.append(line.encode(), event=True)


@pytest.mark.django_db
def test_embedded_path_hostile_values_arrive_fitted_and_later_rows_flow(
    writer: Callable[[], LedgerWriter], settings: Any
) -> None:
    settings.REDIS_URL = ""
    user, _ = get_or_create_user("독성")
    key, _ = create_api_key(user)
    ledger = writer()
    hostile = hostile_events(user.pk, key.pk)
    for event in hostile:
        ledger.record(event)
    spool_poison(ledger, hostile[0])
    later = hostile_events(user.pk, key.pk)[:1]
    ledger.record(later[0])
    ledger.flush()
    written = {r.request_id: r for r in UsageRecord.objects.filter(user=user)}
    # Every event, including the unfitted row (fitted again at the write site) and the later one.
    assert set(written) >= {e.request_id for e in hostile + later}
    assert len(written) == len(hostile) + len(later) + 1
    assert written[hostile[1].request_id].error_type == HUGE_TYPE[:60]
    assert written[hostile[2].request_id].completion_tokens == INT_MAX
    assert written[hostile[3].request_id].model == "qwenevil"
    letters = LedgerDeadLetter.objects.filter(source="spool").order_by("pk")
    assert [letter.raw for letter in letters] == ['"not json at all"', '["wrong", "shape"]']
    assert "not JSON" in letters[0].error and "18 values" in letters[1].error
    assert ledger.pending == 0 and ledger.dead_lettered == 2


@pytest.mark.django_db
def test_a_batch_failing_in_the_database_is_retried_row_by_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row that gets past the cleaning (a worker older than the gateway that wrote it) fails
    alone in the database; the rest of its batch is written."""
    from quotas import services

    user, _ = get_or_create_user("한줄씩")
    now = time.time()
    rows = [
        [uuid.uuid4().hex, user.pk, None, "m", "e", 1, 2, 0, 1, "upstream", 200, kind, False,
         False, now, now, None, None]
        for kind in ("", LONG_TYPE, "", "nul\x00", "")
    ]  # fmt: skip
    monkeypatch.setattr(services, "clean_row", lambda row, now: tuple(row))
    assert services.record_usage_rows(rows, "stream") == 2
    assert UsageRecord.objects.filter(user=user).count() == 3
    errors = list(LedgerDeadLetter.objects.values_list("error", flat=True))
    assert len(errors) == 2 and all("DataError" in e or "ValueError" in e for e in errors)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_stream_path_dead_letters_and_drains_the_rest(settings: Any, redis_url: str) -> None:
    settings.LEDGER_STREAM = f"test-poison-{uuid.uuid4().hex[:8]}"
    connection = redis_lib.Redis.from_url(redis_url)
    try:
        user, _ = get_or_create_user("독성스트림")
        key, _ = create_api_key(user)
        hostile = hostile_events(user.pk, key.pk)
        good = [json.dumps(event_row(e)) for e in hostile]
        unfitted = list(event_row(hostile[0]))
        unfitted[0], unfitted[5] = uuid.uuid4().hex, BEYOND_BIGINT
        ledger_stream.append_lines(
            connection, [*good[:3], "{torn", json.dumps(unfitted), '["x"]', *good[3:]]
        )
        assert ledger_stream.drain() == len(hostile) + 3
        assert ledger_stream.backlog(connection) == 0  # nothing left to block the stream
        assert UsageRecord.objects.filter(user=user).count() == len(hostile) + 1
        assert LedgerDeadLetter.objects.filter(source="stream").count() == 2
    finally:
        connection.delete(settings.LEDGER_STREAM)
        connection.close()


@pytest.mark.django_db
def test_the_admin_replays_dead_letters_and_says_who(admin_client: Any, admin_user: Any) -> None:
    user, _ = get_or_create_user("재처리")
    now, request_id = time.time(), uuid.uuid4().hex
    fixed = [request_id, user.pk, None, "m", "e", 3, 4, 0, 3, "upstream", 200, "", False,
             False, now, now, None, None]  # fmt: skip
    replayable = LedgerDeadLetter.objects.create(
        source="stream", request_id=request_id, raw=json.dumps(fixed), error="DataError: old"
    )
    hopeless = LedgerDeadLetter.objects.create(source="spool", raw='"not a row"', error="x")
    changelist = "/admin/quotas/ledgerdeadletter/"
    assert admin_client.get(changelist).status_code == 200
    response = admin_client.post(
        changelist,
        {"action": "replay", "_selected_action": [replayable.pk, hopeless.pk]},
        follow=True,
    )
    assert response.status_code == 200
    replayable.refresh_from_db()
    hopeless.refresh_from_db()
    assert replayable.replayed_by == admin_user and replayable.replayed_at is not None
    assert hopeless.replayed_at is None and "BadRow" in hopeless.error
    assert UsageRecord.objects.get(request_id=request_id).completion_tokens == 4
    page = admin_client.get(f"{changelist}{replayable.pk}/change/")
    assert page.status_code == 200 and request_id.encode() in page.content


SQLITE_SCRIPT = """
import json, math, os, sys, time, uuid
import django
django.setup()
from django.conf import settings
from django.core.management import call_command
call_command("migrate", verbosity=0)
from pathlib import Path
from gateway.ledger import LedgerWriter, UsageEvent, event_row
from quotas import ledger_stream
from quotas.models import LedgerDeadLetter, UsageRecord
now = time.time()
def event(i, **kw):
    base = dict(request_id=f"{PATH}-{i}", user_id=1, key_id=1, model="m", endpoint="e",
                status_code=200, streamed=False, started_at=now, finished_at=now)
    return UsageEvent(**{**base, **kw})
hostile = [event(0, error_type="x" * 61), event(1, error_type="y" * 10000),
           event(2, completion_tokens=2**70), event(3, model="a\\x00b")]
ledger = LedgerWriter(3600, 10_000, Path(sys.argv[1]))
for e in hostile:
    ledger.record(e)
ledger.start()
ledger._spool.append(b"garbage", event=True)
unfitted = list(event_row(hostile[0])); unfitted[0] = f"{PATH}-raw"; unfitted[5] = 2**70
ledger._spool.append(json.dumps(unfitted).encode(), event=True)
ledger.record(event(9))
ledger.flush()
ledger.close()
if settings.REDIS_URL:
    ledger_stream.drain()
print(json.dumps({
    "rows": sorted(UsageRecord.objects.values_list("request_id", flat=True)),
    "tokens": UsageRecord.objects.get(request_id=f"{PATH}-2").completion_tokens,
    "dead": LedgerDeadLetter.objects.count(),
}))
"""


def run_on_sqlite(tmp_path: Path, path: str, env: dict[str, str]) -> dict[str, Any]:
    script = textwrap.dedent(SQLITE_SCRIPT).replace("{PATH}", path)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "spool")],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "DEBUG": "1", "DJANGO_SETTINGS_MODULE": "limiter_site.settings",
             "DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}", **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_on_sqlite_both_paths_write_everything_and_dead_letter_the_rest(tmp_path: Path) -> None:
    embedded = run_on_sqlite(tmp_path, "embedded", {"REDIS_URL": ""})
    expected = [f"embedded-{i}" for i in (0, 1, 2, 3, 9)] + ["embedded-raw"]
    assert embedded == {"rows": sorted(expected), "tokens": 2**31 - 1, "dead": 1}


@pytest.mark.redis
def test_on_sqlite_the_stream_path_too(tmp_path: Path, redis_url: str) -> None:
    stream = f"test-sqlite-{uuid.uuid4().hex[:8]}"
    streamed = run_on_sqlite(tmp_path, "stream", {"REDIS_URL": redis_url, "LEDGER_STREAM": stream})
    expected = [f"stream-{i}" for i in (0, 1, 2, 3, 9)] + ["stream-raw"]
    assert streamed == {"rows": sorted(expected), "tokens": 2**31 - 1, "dead": 1}
    connection = redis_lib.Redis.from_url(redis_url)
    assert connection.xlen(stream) == 0
    connection.delete(stream)
    connection.close()
