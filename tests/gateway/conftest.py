"""A running world for end-to-end tests: SGLang simulators and a uvicorn gateway as processes.

Data is created once per module and committed (the gateway process reads it through its own
database connection), then removed at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connection

from tests.procs import free_port, ledger_worker, running, simulator

FAST_MODEL = "Qwen/Qwen2.5-7B-Instruct"
SLOW_MODEL = "Qwen/Qwen2.5-7B-Instruct-slow"


def database_url_for_subprocess() -> str:
    """The test database (already created by pytest-django) as a DATABASE_URL."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@dataclass
class World:
    url: str
    keys: dict[str, str]
    fast_upstream: str
    slow_upstream: str
    dead_upstream: str
    db_blocker: Any
    gateway_pid: int = 0
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def db(self) -> Any:
        return self.db_blocker.unblock()

    def billed_tokens(self, user_id: int, timeout: float = 10.0, **filters: Any) -> int:
        """The tokens billed by the user's ledger row matching `filters`, once it is there."""
        from quotas.models import UsageRecord

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db():
                row = UsageRecord.objects.filter(user_id=user_id, **filters).first()
            if row is not None:
                return row.prompt_tokens + row.completion_tokens
            time.sleep(0.1)
        raise AssertionError(f"no ledger row for user {user_id} after {timeout}s")

    def ledger_row(self, request_id: str, timeout: float = 10.0) -> Any:
        from quotas.models import UsageRecord

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db():
                row = (
                    UsageRecord.objects.select_related("user").filter(request_id=request_id).first()
                )
            if row is not None:
                return row
            time.sleep(0.1)
        raise AssertionError(f"no ledger row for {request_id} after {timeout}s")


MONITORING_TOKEN = "test-monitoring-token-0123456789abcdef"
# The simulator's test hooks travel in the body as `sim` (sglang_sim/server.py): a field the
# gateway refuses unless a plan enables it, as an operator would enable any extra field.
HOOKS_PLAN = "simulator-hooks"


def hooks_plan() -> Any:
    from quotas.models import Plan

    plan, _ = Plan.objects.get_or_create(
        name=HOOKS_PLAN, defaults={"extra_request_fields": ["sim"]}
    )
    return plan


def make_user(username: str, plan: Any = None, **overrides: Any) -> tuple[Any, str]:
    from accounts.services import create_api_key, get_or_create_user
    from quotas.services import default_plan, set_user_quota

    user, _ = get_or_create_user(username)
    set_user_quota(user, plan or default_plan(), actor=None, **overrides)
    _, raw = create_api_key(user, actor=None, name=f"{username} test key")
    return user, raw


def make_models(fast: str, slow: str, dead: str) -> None:
    from gateway.models import ServedModel

    ServedModel.objects.update_or_create(
        name=FAST_MODEL,
        defaults={"aliases": ["korean-qwen"], "upstream_url": fast, "lora_adapters": ["legal-ko"]},
    )
    ServedModel.objects.update_or_create(
        name=SLOW_MODEL, defaults={"aliases": ["slow-qwen"], "upstream_url": slow}
    )
    ServedModel.objects.update_or_create(
        name="dead-model", defaults={"upstream_url": dead, "tokenizer": ""}
    )
    ServedModel.objects.update_or_create(
        name="impatient-model",
        defaults={"upstream_url": slow, "request_timeout_seconds": 0.5},
    )


def remove_world_data(usernames: list[str]) -> None:
    from django.contrib.auth.models import User

    from gateway.models import ServedModel
    from quotas.models import Plan, UsageRecord

    users = User.objects.filter(username__in=usernames)
    UsageRecord.objects.filter(user__in=users).delete()
    users.delete()
    Plan.objects.filter(name=HOOKS_PLAN, quotas__isnull=True).delete()
    ServedModel.objects.filter(
        name__in=[FAST_MODEL, SLOW_MODEL, "dead-model", "impatient-model"]
    ).delete()


@pytest.fixture(scope="module")
def world(django_db_setup: None, django_db_blocker: Any) -> Iterator[World]:
    usernames = ["한국어개발자", "사용자1", "restricted"]
    with ExitStack() as stack:
        fast = stack.enter_context(simulator(FAST_MODEL, tokens_per_second=0, ttft_ms=0))
        slow = stack.enter_context(simulator(SLOW_MODEL, tokens_per_second=20, ttft_ms=10))
        dead = f"http://127.0.0.1:{free_port()}"
        with django_db_blocker.unblock():
            make_models(fast, slow, dead)
            plan = hooks_plan()
            keys = {
                "dev": make_user("한국어개발자", plan)[1],
                "user1": make_user("사용자1", plan)[1],
                "restricted": make_user("restricted", plan, allowed_models=["korean-qwen"])[1],
            }
            database_url = database_url_for_subprocess()
        stack.enter_context(ledger_worker({"DATABASE_URL": database_url}))
        port = free_port()
        gateway = stack.enter_context(
            running(
                gateway_args(port),
                f"http://127.0.0.1:{port}/health",
                env={
                    "DATABASE_URL": database_url,
                    "SGLANG_URL": fast,
                    "GATEWAY_MAX_BODY_BYTES": str(256 * 1024),
                    "GATEWAY_LEDGER_FLUSH_SECONDS": "0.1",
                    "GATEWAY_MONITORING_TOKEN": MONITORING_TOKEN,
                    "GATEWAY_BODY_TIMEOUT_SECONDS": "2",
                },
            )
        )
        yield World(
            url=f"http://127.0.0.1:{port}",
            keys=keys,
            fast_upstream=fast,
            slow_upstream=slow,
            dead_upstream=dead,
            db_blocker=django_db_blocker,
            gateway_pid=gateway.pid,
        )
    with django_db_blocker.unblock():
        remove_world_data(usernames)


def gateway_args(port: int) -> list[str]:
    """The gateway as the README serves it: uvicorn, which stops reading a body at our limit."""
    return ["-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on",
            "--no-access-log", "limiter_site.asgi:application"]  # fmt: skip


def serve_gateway(stack: ExitStack, database_url: str, **env: str) -> str:
    """A uvicorn gateway and a Celery ledger worker on the test database until `stack` closes;
    returns the gateway's URL. `env`: more settings (SGLANG_URL, GATEWAY_SELF_CHECK, …)."""
    stack.enter_context(ledger_worker({"DATABASE_URL": database_url}))
    port = free_port()
    stack.enter_context(
        running(
            gateway_args(port),
            f"http://127.0.0.1:{port}/health",
            env={
                "DATABASE_URL": database_url,
                "GATEWAY_LEDGER_FLUSH_SECONDS": "0.1",
                "GATEWAY_MONITORING_TOKEN": MONITORING_TOKEN,
                **env,
            },
        )
    )
    return f"http://127.0.0.1:{port}"


def ledger_row(blocker: Any, request_id: str, timeout: float = 10.0) -> Any:
    """The request's ledger row once a worker has written it."""
    from quotas.models import UsageRecord

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with blocker.unblock():
            row = UsageRecord.objects.filter(request_id=request_id).first()
        if row is not None:
            return row
        time.sleep(0.1)
    raise AssertionError(f"no ledger row for {request_id} after {timeout}s")
