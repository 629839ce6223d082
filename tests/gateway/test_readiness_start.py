"""Readiness waits for the tokenizers: a load balancer sends no request to wait for one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.health import Readiness
from tests.gateway.test_failures_in_process import call

TOKEN = "readiness-test-token-0123456789"


@pytest.fixture
def gateway(settings: Any, transactional_db: None) -> Iterator[Gateway]:
    from gateway.models import ServedModel

    settings.REDIS_URL = ""
    settings.GATEWAY_MONITORING_TOKEN = TOKEN
    ServedModel.objects.create(name="Qwen/Qwen2.5-7B-Instruct", upstream_url="http://up:1")
    made = Gateway()
    yield made
    asyncio.run(made.close())


def test_ready_only_once_every_tokenizer_has_loaded(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def answering(self: Readiness, url: str, configured: str) -> dict[str, Any]:
        return {"url": url, "ok": True, "kind": "sglang"}

    monkeypatch.setattr(Readiness, "probe_upstream", answering)
    loaded: dict[str, str] = {}
    monkeypatch.setattr(gateway.readiness, "token_counter", lambda m: loaded.get(m.name, "loading"))
    headers = {"Authorization": f"Bearer {TOKEN}"}

    starting = call(gateway, "GET", "/health/ready", headers=headers)
    assert starting.status_code == 503 and starting.json()["status"] == "starting"

    loaded["Qwen/Qwen2.5-7B-Instruct"] = "tokenizer:qwen"
    gateway.readiness._expires = 0.0  # the report is cached for a second
    ready = call(gateway, "GET", "/health/ready", headers=headers)
    assert ready.status_code == 200 and ready.json()["status"] == "ok", ready.json()
