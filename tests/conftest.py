"""Shared test set-up.

Tests marked `postgres` or `redis` need those servers. Locally they are skipped when
DATABASE_URL / REDIS_URL do not point at one; under CI=true they fail instead, so CI can never
go green by skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from django.conf import settings

IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres") and settings.DATABASES["default"]["ENGINE"] != (
        "django.db.backends.postgresql"
    ):
        _missing("needs DATABASE_URL=postgres://…")
    if item.get_closest_marker("redis") and not settings.REDIS_URL:
        _missing("needs REDIS_URL=redis://…")


@pytest.fixture
def redis_url() -> Iterator[str]:
    import redis

    if not settings.REDIS_URL:
        _missing("needs REDIS_URL=redis://…")
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"REDIS_URL is set but Redis does not answer: {exc}")
    finally:
        client.close()
    yield settings.REDIS_URL
