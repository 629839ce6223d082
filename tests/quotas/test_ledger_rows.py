"""The ledger's batch write in the embedded mode (no Redis): replay-safe, constant queries per
batch, last-used kept. The Redis-stream path is in test_ledger_stream.py."""

from __future__ import annotations

import time
import uuid

import pytest

from accounts.services import create_api_key, get_or_create_user
from gateway.ledger import LedgerWriter, UsageEvent
from quotas.models import UsageRecord

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def embedded(settings) -> None:
    settings.REDIS_URL = ""


def events(user_id: int, key_id: int, count: int) -> list[UsageEvent]:
    now = time.time()
    return [
        UsageEvent(
            request_id=uuid.uuid4().hex,
            user_id=user_id,
            key_id=key_id,
            model="Qwen/Qwen2.5-7B-Instruct",
            endpoint="chat/completions",
            status_code=200,
            streamed=bool(i % 2),
            started_at=now + i,
            finished_at=now + i + 0.5,
            prompt_tokens=10 + i,
            completion_tokens=20,
            ttft_ms=12.5,
        )
        for i in range(count)
    ]


def test_a_replayed_batch_inserts_nothing_twice(django_assert_max_num_queries) -> None:
    user, _ = get_or_create_user("원장")
    key, _ = create_api_key(user)
    batch = events(user.pk, key.pk, 300)
    writer = LedgerWriter(flush_seconds=60, max_pending=1000)
    for event in batch:
        writer._pending.append(event)
    with django_assert_max_num_queries(8):  # one batch insert, one last-used update: not per row
        writer.flush()
    for event in batch[:100]:
        writer._pending.append(event)
    writer.flush()
    rows = UsageRecord.objects.filter(user=user)
    assert rows.count() == 300
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


def test_events_wait_while_the_database_fails(monkeypatch) -> None:
    user, _ = get_or_create_user("대기")
    key, _ = create_api_key(user)
    writer = LedgerWriter(flush_seconds=60, max_pending=1000)
    for event in events(user.pk, key.pk, 5):
        writer._pending.append(event)

    def broken(rows: object) -> None:
        raise RuntimeError("database down")

    monkeypatch.setattr("quotas.services.record_usage_rows", broken)
    with pytest.raises(RuntimeError):
        writer.flush()
    assert writer.pending == 5
    monkeypatch.undo()
    writer.flush()
    assert writer.pending == 0 and UsageRecord.objects.filter(user=user).count() == 5


def test_backlog_is_bounded() -> None:
    writer = LedgerWriter(flush_seconds=60, max_pending=100)
    writer._thread = object()  # type: ignore[assignment]  # no background writes in this test
    for event in events(1, 1, 150):
        writer.record(event)
    assert writer.pending == 100 and writer.dropped == 50
