"""Shared test set-up.

Tests marked `postgres` or `redis` need those servers. Locally they are skipped when
DATABASE_URL / REDIS_URL do not point at one; under CI=true they fail instead, so CI can never
go green by skipping them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


# A real model server (llama-cpp-python serving a GGUF) is optional: its tests
# (tests/gateway/test_real_upstream.py) run when both are given and are deselected otherwise:
# never skipped, since CI=true fails on a skip and CI does not build llama.cpp.
REAL_UPSTREAM = bool(
    os.environ.get("REAL_UPSTREAM_PYTHON") and os.environ.get("REAL_UPSTREAM_GGUF")
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REAL_UPSTREAM:
        return
    real = [item for item in items if item.get_closest_marker("real_upstream")]
    if real:
        config.hook.pytest_deselected(items=real)
        items[:] = [item for item in items if not item.get_closest_marker("real_upstream")]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres") and settings.DATABASES["default"]["ENGINE"] != (
        "django.db.backends.postgresql"
    ):
        _missing("needs DATABASE_URL=postgres://…")
    if item.get_closest_marker("redis") and not settings.REDIS_URL:
        _missing("needs REDIS_URL=redis://…")


@pytest.fixture(autouse=True)
def no_leaked_ledger_writer() -> Iterator[None]:
    """Whatever starts a ledger writer closes it: a writer left running ships into whatever
    database comes next (one once flushed into a dropped test database)."""
    import threading

    yield
    leaked = [t for t in threading.enumerate() if t.name == "ledger-writer"]
    assert not leaked, "a test left a ledger writer running: close() the writer or the gateway"


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


@pytest.fixture(scope="session")
def django_db_setup(
    request: pytest.FixtureRequest,
    django_test_environment: None,
    django_db_blocker: Any,
    django_db_keepdb: bool,
    django_db_modify_db_settings: None,
) -> Iterator[None]:
    """Always create the test database, also when only process tests (which reach it through
    module fixtures, not the `db` fixture pytest-django looks for) are collected."""
    from django.test.utils import setup_databases, teardown_databases

    verbosity = request.config.option.verbose
    with django_db_blocker.unblock():
        config = setup_databases(
            verbosity=verbosity, interactive=False, keepdb=django_db_keepdb, aliases={"default"}
        )
    yield
    if not django_db_keepdb:
        with django_db_blocker.unblock():
            _disconnect_other_sessions()
            teardown_databases(config, verbosity=verbosity)


def _disconnect_other_sessions() -> None:
    # Worker threads of in-process gateways keep their own connections; Postgres refuses to
    # drop a database that still has sessions.
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(scope="session", autouse=True)
def private_redis_prefix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Limiter counters and ledger stream of this run only: user ids restart with each test
    database."""
    import uuid

    prefix = f"test-{uuid.uuid4().hex[:10]}"
    # Inherited by server and worker processes started by the tests.
    os.environ["LIMITER_REDIS_PREFIX"] = settings.LIMITER_REDIS_PREFIX = prefix
    os.environ["LEDGER_STREAM"] = settings.LEDGER_STREAM = f"{prefix}:ledger"
    os.environ["CELERY_QUEUE"] = settings.CELERY_TASK_DEFAULT_QUEUE = f"{prefix}:tasks"
    # Periodic tasks run when a test says so, not on a gateway's timer.
    os.environ["EMBEDDED_BEAT"] = "0"
    settings.EMBEDDED_BEAT = False
    # Likewise the tokenizer self-check's probes: they would land in the simulator's
    # /sim/last_request and request counts that tests read (tests/gateway/test_self_check.py
    # turns it on).
    os.environ["GATEWAY_SELF_CHECK"] = "0"
    settings.GATEWAY_SELF_CHECK = False
    # Spooled usage events of this run only (a spool outlives its processes by design).
    spool = tmp_path_factory.mktemp("ledger-spool")
    os.environ["LEDGER_SPOOL_DIR"] = str(spool)
    settings.LEDGER_SPOOL_DIR = spool
    if settings.REDIS_URL:
        _require_redis_persistence()
    yield
    if settings.REDIS_URL:
        import redis

        connection = redis.Redis.from_url(settings.REDIS_URL)
        connection.delete(f"{prefix}:ledger")
        connection.close()


def _require_redis_persistence() -> None:
    """Gateways refuse to be ready on a Redis without the append-only file (README,
    "Production"); a test Redis without it is given it, for this server's lifetime only."""
    import redis

    connection = redis.Redis.from_url(settings.REDIS_URL)
    try:
        if connection.config_get("appendonly").get("appendonly") != b"yes":
            connection.config_set("appendonly", "yes")
    except redis.RedisError:
        pass  # not reachable: the tests that need it say so (the redis_url fixture)
    finally:
        connection.close()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real three-node Redis Cluster for this test session (tests/procs.py), as a node URL."""
    from tests.procs import redis_cluster

    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        _missing("needs redis-server for the Redis Cluster tests")
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as ports:
        yield f"redis://127.0.0.1:{ports[0]}/0"
