"""The gateway's usage spool and its batch write in the embedded mode (no Redis): replay-safe,
constant queries per batch, last-used kept, nothing lost when a process dies. The Redis-stream
path is in test_ledger_stream.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from accounts.services import create_api_key, get_or_create_user
from gateway.ledger import LedgerWriter
from quotas.models import UsageRecord
from tokenlimit.ledger_rows import UsageRow

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(autouse=True)
def embedded(settings) -> None:
    settings.REDIS_URL = ""


def events(user_id: int, key_id: int, count: int) -> list[UsageRow]:
    now = time.time()
    return [
        UsageRow(
            request_id=uuid.uuid4().hex,
            user_id=user_id,
            api_key_id=key_id,
            model="Qwen/Qwen2.5-7B-Instruct",
            endpoint="chat/completions",
            status_code=200,
            streamed=bool(i % 2),
            started_at=now + i,
            finished_at=now + i + 0.5,
            prompt_tokens=10 + i,
            completion_tokens=20,
            time_to_first_token_ms=12.5,
        )
        for i in range(count)
    ]


@pytest.fixture
def writer() -> Iterator[Callable[..., LedgerWriter]]:
    made: list[LedgerWriter] = []

    def make(spool: Path, max_pending: int = 10_000) -> LedgerWriter:
        made.append(LedgerWriter(flush_seconds=3600, max_pending=max_pending, spool_dir=spool))
        return made[-1]

    yield make
    for ledger in made:
        ledger.close()


def test_a_batch_is_written_once_with_constant_queries(
    writer: Callable[..., LedgerWriter], tmp_path: Path, django_assert_max_num_queries
) -> None:
    user, _ = get_or_create_user("원장")
    key, _ = create_api_key(user, actor=None)
    batch = events(user.pk, key.pk, 300)
    ledger = writer(tmp_path)
    for event in batch:
        ledger.record(event)
    assert ledger.pending == 300
    with django_assert_max_num_queries(8):  # one batch insert, one last-used update: not per row
        assert ledger.flush() == 300
    for event in batch[:100]:  # the same events again (a replay)
        ledger.record(event)
    ledger.flush()
    rows = UsageRecord.objects.filter(user=user)
    assert rows.count() == 300 and ledger.pending == 0
    assert not list(tmp_path.glob("*.ready"))
    first = rows.get(request_id=batch[0].request_id)
    assert (first.prompt_tokens, first.completion_tokens, first.time_to_first_token_ms) == (
        10,
        20,
        12.5,
    )
    assert abs(first.started_at.timestamp() - batch[0].started_at) < 1e-3
    key.refresh_from_db()
    assert key.last_used_at is not None
    assert abs(key.last_used_at.timestamp() - batch[-1].started_at) < 1e-3


def test_events_wait_on_disk_while_the_database_fails(
    writer: Callable[..., LedgerWriter], tmp_path: Path, monkeypatch
) -> None:
    user, _ = get_or_create_user("대기")
    key, _ = create_api_key(user, actor=None)
    ledger = writer(tmp_path)
    for event in events(user.pk, key.pk, 5):
        ledger.record(event)

    def broken(*args: object) -> None:
        raise RuntimeError("database down")

    monkeypatch.setattr("quotas.services.record_usage_lines", broken)
    with pytest.raises(RuntimeError):
        ledger.flush()
    assert ledger.pending == 5 and len(list(tmp_path.glob("*.ready"))) == 1
    monkeypatch.undo()
    ledger.flush()
    assert ledger.pending == 0 and UsageRecord.objects.filter(user=user).count() == 5


def test_the_spool_is_bounded(writer: Callable[..., LedgerWriter], tmp_path: Path) -> None:
    ledger = writer(tmp_path, max_pending=100)
    for event in events(1, 1, 150):
        ledger.record(event)
    assert ledger.pending == 100 and ledger.dropped == 50


def test_events_of_a_killed_process_are_shipped_by_the_next_one(
    writer: Callable[..., LedgerWriter], tmp_path: Path
) -> None:
    user, _ = get_or_create_user("부활")
    key, _ = create_api_key(user, actor=None)
    script = textwrap.dedent(
        f"""
        import os, signal, time, django
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
        django.setup()
        from pathlib import Path
        from gateway.ledger import LedgerWriter
        from tokenlimit.ledger_rows import UsageRow
        spool = Path({str(tmp_path)!r})
        ledger = LedgerWriter(flush_seconds=3600, max_pending=10_000, spool_dir=spool)
        for i in range(250):
            now = time.time()
            ledger.record(UsageRow(f"killed-{{i}}", {user.pk}, {key.pk}, "m", "chat/completions",
                                     200, False, now, now, 1, 2))
        ledger._spool._file.write(b'["torn')  # killed in the middle of a line
        ledger._spool._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no flush
        """
    )
    subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={"DEBUG": "1", "PATH": ""}, check=False
    )
    assert list(tmp_path.glob("*.open"))
    adopter = writer(tmp_path)
    assert adopter.adopt_dead() == []  # every request it opened had finished
    assert adopter.flush() == 250
    assert UsageRecord.objects.filter(user=user).count() == 250
    assert all(path.stat().st_size == 0 for path in tmp_path.iterdir())  # only a fresh segment


def test_writers_sharing_a_spool_ship_only_their_own_segments(
    writer: Callable[..., LedgerWriter], tmp_path: Path
) -> None:
    import os
    import socket

    user, _ = get_or_create_user("공유")
    key, _ = create_api_key(user, actor=None)
    first, second = writer(tmp_path), writer(tmp_path)
    for event in events(user.pk, key.pk, 10):
        first.record(event)
    for event in events(user.pk, key.pk, 5):
        second.record(event)
    # A segment of another live process on this host (the parent of this test process).
    live = tmp_path / f"{socket.gethostname()}~{os.getppid()}~other~1.ready"
    live.write_text("")
    assert first.flush() == 10 and second.flush() == 5
    assert first.pending == 0 and second.pending == 0
    assert live.exists()
    assert UsageRecord.objects.filter(user=user).count() == 15


def test_the_row_schema_is_the_ledger_table() -> None:
    """UsageRow (tokenlimit, Django-free) and UsageRecord (the table) name the same columns:
    adding one to either without the other fails here, not in a rolling deploy."""
    from tokenlimit.ledger_rows import LEDGER_COLUMNS

    columns = {f.attname for f in UsageRecord._meta.concrete_fields} - {"id"}
    assert set(LEDGER_COLUMNS) == columns and len(LEDGER_COLUMNS) == len(columns)
