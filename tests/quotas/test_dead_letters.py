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
from gateway.ledger import LedgerWriter
from quotas import ledger_stream
from quotas.models import LedgerDeadLetter, UsageRecord
from tokenlimit import ledger_rows
from tokenlimit.ledger_rows import (
    BIGINT_MAX,
    INT_MAX,
    LEDGER_COLUMNS,
    BadRow,
    UsageRow,
    clean_row,
    wire_line,
)

ROOT = Path(__file__).resolve().parent.parent.parent
LONG_TYPE = "x" * 61
HUGE_TYPE = "오류" * 5000  # 10,000 characters
BEYOND_BIGINT = 2**70


def hostile_events(user_id: int, key_id: int) -> list[UsageRow]:
    """What an upstream or client could put into an event, one poison per event."""
    now = time.time()

    def event(**fields: Any) -> UsageRow:
        base: dict[str, Any] = {
            "request_id": uuid.uuid4().hex, "user_id": user_id, "api_key_id": key_id,
            "model": "m", "endpoint": "chat/completions", "status_code": 502, "streamed": False,
            "started_at": now, "finished_at": now + 0.1,
        }  # fmt: skip
        return UsageRow(**{**base, **fields})

    return [
        event(error_type=LONG_TYPE),
        event(error_type=HUGE_TYPE),
        event(completion_tokens=BEYOND_BIGINT, prompt_tokens=-5),
        event(model="qwen\x00evil", error_type="nul\x00byte"),
        event(error_type="\ud800lone surrogate", upstream_latency_ms=math.nan),
        event(status_code=70000, time_to_first_token_ms=math.inf, usage_source="made-up"),
    ]


def by_name(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(LEDGER_COLUMNS, row, strict=True))


def wire(row: UsageRow) -> dict[str, Any]:
    """The row as the spool and the stream carry it, after the gateway fitted it."""
    return dict(json.loads(wire_line(clean_row(row, time.time))))


def test_values_are_fitted_to_their_columns() -> None:
    # A positional row, as gateways wrote before the schema had names: read by its legacy order.
    row = by_name(clean_row(
        ["r" * 100, BEYOND_BIGINT, -1, "m" * 300, "e", BEYOND_BIGINT, -3, "7", 2.9, "??", 99999,
         HUGE_TYPE, 1, 0, math.nan, 1e300, -4.0, math.inf],
        lambda: 1000.0,
    ))  # fmt: skip
    assert row["request_id"] == "r" * 64 and row["user_id"] == BIGINT_MAX
    assert row["api_key_id"] == 0 and len(row["model"]) == 200
    assert row["prompt_tokens"] == INT_MAX and row["completion_tokens"] == 0
    assert row["cached_tokens"] == 7 and row["estimated_prompt_tokens"] == 2
    assert row["usage_source"] == "gateway" and row["status_code"] == 2**15 - 1
    assert len(row["error_type"]) == 60 and row["streamed"] is True
    assert row["client_disconnected"] is False
    assert row["finished_at"] == ledger_rows.LATEST_EPOCH
    assert row["started_at"] == row["finished_at"]  # start falls back to end
    assert row["upstream_latency_ms"] == 0.0 and row["time_to_first_token_ms"] is None
    named = {"v": 1, "request_id": "n", "user_id": 1, "api_key_id": None, "model": "m",
             "endpoint": "e", "status_code": 200, "streamed": False, "started_at": 1.0,
             "finished_at": 2.0, "error_type": "a\x00b\ud800",
             "upstream": "http://" + "u" * 400}  # fmt: skip
    fitted = by_name(clean_row(named, time.time))
    assert fitted["error_type"] == "ab?" and len(fitted["upstream"]) == 300
    assert row["upstream"] == ""  # a legacy row names no server


def test_rows_of_other_schema_versions_are_read_by_name_never_shifted() -> None:
    now = time.time()
    current = wire(UsageRow("cur", 1, 2, "m", "e", 429, False, now, now, error_type="tokens"))
    # A newer writer added a column this reader does not have: the known ones are read.
    newer = {**current, "v": 2, "request_id": "new", "queue_ms": 12.5}
    newer_row = by_name(clean_row(newer, time.time))
    assert (newer_row["status_code"], newer_row["error_type"]) == (429, "tokens")
    # An older writer without some optional columns: their defaults.
    older = {k: v for k, v in current.items() if k not in ("cached_tokens", "usage_source")}
    older_row = by_name(clean_row({**older, "request_id": "old"}, time.time))
    assert older_row["cached_tokens"] == 0 and older_row["status_code"] == 429
    # On the wire: the version, then every field by name.
    assert list(current)[1:] == list(LEDGER_COLUMNS)


@pytest.mark.parametrize(
    "raw",
    [["only", "two"], "a string", {"a": "dict"}, 42, [None] * 18, ["", *[0] * 17],
     {"v": 1, "request_id": "no-status"}, {"v": "1", "request_id": "x"}],
)  # fmt: skip
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


def spool_poison(ledger: LedgerWriter, good: UsageRow) -> None:
    """Lines no current gateway writes (an old or broken one might): not JSON, the wrong shape,
    an unfitted row."""
    ledger.start()
    assert ledger._spool is not None
    unfitted = {**wire(good), "request_id": uuid.uuid4().hex, "error_type": LONG_TYPE}
    for line in ("not json at all", '["wrong", "shape"]', json.dumps(unfitted)):
        ledger._spool.append(line.encode(), event=True)


@pytest.mark.django_db
def test_embedded_path_hostile_values_arrive_fitted_and_later_rows_flow(
    writer: Callable[[], LedgerWriter], settings: Any
) -> None:
    settings.REDIS_URL = ""
    user, _ = get_or_create_user("독성")
    key, _ = create_api_key(user, actor=None)
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
        wire(UsageRow(uuid.uuid4().hex, user.pk, None, "m", "e", 200, False, now, now, 1, 2))
        | {"error_type": kind}
        for kind in ("", LONG_TYPE, "", "nul\x00", "")
    ]
    monkeypatch.setattr(
        services, "clean_row", lambda row, now: tuple(row[name] for name in LEDGER_COLUMNS)
    )
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
        key, _ = create_api_key(user, actor=None)
        hostile = hostile_events(user.pk, key.pk)
        good = [json.dumps(wire(e)) for e in hostile]
        unfitted = {**wire(hostile[0]), "request_id": uuid.uuid4().hex}
        unfitted["prompt_tokens"] = BEYOND_BIGINT
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
from gateway.ledger import LedgerWriter
from tokenlimit.ledger_rows import UsageRow, clean_row, wire_line
from quotas import ledger_stream
from quotas.models import LedgerDeadLetter, UsageRecord
now = time.time()
def event(i, **kw):
    base = dict(request_id=f"{PATH}-{i}", user_id=1, api_key_id=1, model="m", endpoint="e",
                status_code=200, streamed=False, started_at=now, finished_at=now)
    return UsageRow(**{**base, **kw})
hostile = [event(0, error_type="x" * 61), event(1, error_type="y" * 10000),
           event(2, completion_tokens=2**70), event(3, model="a\\x00b")]
ledger = LedgerWriter(3600, 10_000, Path(sys.argv[1]))
for e in hostile:
    ledger.record(e)
ledger.start()
ledger._spool.append(b"garbage", event=True)
unfitted = json.loads(wire_line(clean_row(hostile[0], time.time)))
unfitted["request_id"] = f"{PATH}-raw"; unfitted["prompt_tokens"] = 2**70
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
