"""The project's own deploy checks (`manage.py check --deploy --database default`), each seen
failing and passing. tests/deploy/test_entrypoint_roles.py runs the whole pre-flight role."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core import checks

from accounts.services import QUICK_START_KEYS, import_api_key, revoke_api_keys
from gateway.models import ServedModel, TokenizerCheck
from tests.procs import RedisProcess, free_port, simulator


def found(databases: list[str] | None = None) -> set[str]:
    messages = checks.run_checks(
        include_deployment_checks=True, tags=["limiter"], databases=databases
    )
    return {message.id for message in messages if message.id}


@pytest.mark.django_db
def test_the_public_quick_start_keys_fail_the_preflight(django_user_model: Any) -> None:
    user = django_user_model.objects.create(username="quickstart-owner")
    key, _ = import_api_key(user, sorted(QUICK_START_KEYS)[0], actor=None)
    assert "accounts.E010" in found(["default"])
    assert "accounts.E010" not in found()  # database checks need --database
    revoke_api_keys([key], actor=None)
    assert "accounts.E010" not in found(["default"])


@pytest.mark.django_db
def test_an_upstream_that_does_not_answer_is_named(settings: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with simulator() as alive:
        settings.SGLANG_URL = alive
        ServedModel.objects.create(name="preflight-dead", upstream_url=f"{dead}/v1")
        messages = checks.run_checks(
            include_deployment_checks=True, tags=["limiter"], databases=["default"]
        )
    unreachable = [m.msg for m in messages if m.id == "gateway.W010"]
    assert len(unreachable) == 1 and dead in unreachable[0]  # the live simulator is not named


@pytest.mark.django_db
def test_a_failed_or_missing_self_check_is_reported() -> None:
    model = ServedModel.objects.create(name="preflight-checked")
    assert "gateway.W011" in found(["default"])
    TokenizerCheck.objects.create(model=model, outcome="ok", counter_source="tokenizer:x")
    assert not {"gateway.W011", "gateway.W012"} & found(["default"])
    TokenizerCheck.objects.create(model=model, outcome="mismatch", detail="korean +21")
    assert "gateway.W012" in found(["default"])  # the latest check counts


def test_static_files_must_be_collected(settings: Any, tmp_path: Path) -> None:
    settings.WHITENOISE_USE_FINDERS = False
    settings.STATIC_ROOT = tmp_path
    assert "gateway.E010" in found()
    (tmp_path / "admin" / "css").mkdir(parents=True)
    (tmp_path / "admin" / "css" / "base.css").write_text("body {}")
    assert "gateway.E010" not in found()
    settings.WHITENOISE_USE_FINDERS = True
    assert "gateway.W013" in found()


@pytest.mark.redis
def test_redis_without_the_append_only_file_fails_the_preflight(
    settings: Any, tmp_path: Path
) -> None:
    settings.LEDGER_REDIS_PERSISTENCE = "require"
    volatile, durable = RedisProcess(free_port()), RedisProcess(free_port(), tmp_path)
    volatile.start()
    durable.start()
    try:
        settings.REDIS_URL = volatile.url
        assert "quotas.E011" in found()
        settings.REDIS_URL = durable.url
        assert "quotas.E011" not in found()
        settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nobody there
        assert "quotas.E011" in found()
        settings.REDIS_URL = ""
        assert "quotas.W010" in found()
    finally:
        volatile.stop()
        durable.stop()
