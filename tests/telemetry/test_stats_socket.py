"""`/ws/stats/` through the real ASGI application: staff only, once-a-second summaries."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import Client

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def production_like_secret(settings: Any) -> None:
    # Importing the ASGI application runs the security checks; tests run with DEBUG off.
    settings.SECRET_KEY = "a-test-secret-that-is-not-the-development-default-" * 2


def session_cookie(user: User) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    cookie = client.cookies["sessionid"].value
    return [(b"cookie", f"sessionid={cookie}".encode()), (b"origin", b"http://testserver")]


async def connect(headers: list[tuple[bytes, bytes]]) -> tuple[WebsocketCommunicator, Any]:
    from limiter_site.asgi import application

    communicator = WebsocketCommunicator(application, "/ws/stats/", headers=headers)
    return communicator, await communicator.connect()


def test_staff_receive_gateway_summaries(settings: Any) -> None:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    headers = session_cookie(User.objects.create_user("운영자", is_staff=True))

    async def scenario() -> dict[str, Any]:
        from limiter_site.asgi import gateway

        communicator, (connected, _) = await connect(headers)
        assert connected
        gateway.stats.requests, gateway.stats.rate_limited, gateway.stats.tokens = 10, 2, 500
        await gateway.stats.publish(seconds=2.0)
        message = await communicator.receive_json_from(timeout=2)
        await communicator.disconnect()
        return message

    message = asyncio.run(scenario())
    assert message["kind"] == "gateway"
    assert message["requests_per_second"] == 5.0 and message["rate_limited_per_second"] == 1.0
    assert message["tokens_per_second"] == 250.0 and "in_flight" in message


@pytest.mark.parametrize("who", ["anonymous", "not staff"])
def test_others_are_refused(who: str) -> None:
    headers = [(b"origin", b"http://testserver")]
    if who == "not staff":
        headers = session_cookie(User.objects.create_user("사용자"))

    async def scenario() -> tuple[bool, Any]:
        communicator, (connected, code) = await connect(headers)
        await communicator.disconnect()
        return connected, code

    connected, code = asyncio.run(scenario())
    assert not connected and code == 4403


def test_sglang_samples_reach_the_dashboards(settings: Any) -> None:
    from telemetry.sglang import Sample
    from telemetry.tasks import publish_sglang

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    headers = session_cookie(User.objects.create_user("운영자2", is_staff=True))
    sample = Sample.__new__(Sample)
    for field, value in {
        "upstream_url": "http://gpu-1:8000", "ok": True, "running_requests": 3.0,
        "queued_requests": 1.0, "kv_cache_usage": 0.42, "prefix_cache_hit_rate": 0.5,
        "generation_throughput": 812.0,
    }.items():  # fmt: skip
        object.__setattr__(sample, field, value)

    async def scenario() -> dict[str, Any]:
        from asgiref.sync import sync_to_async

        communicator, (connected, _) = await connect(headers)
        assert connected
        await sync_to_async(publish_sglang)([sample])
        message = await communicator.receive_json_from(timeout=2)
        await communicator.disconnect()
        return message

    message = asyncio.run(scenario())
    assert message["kind"] == "sglang"
    assert message["upstreams"][0]["kv_cache_usage"] == 0.42


@pytest.mark.parametrize(
    "origin", [b"http://evil.example", b"https://testserver.evil.example", b"null", None]
)
def test_a_staff_session_from_a_foreign_origin_is_refused(origin: bytes | None) -> None:
    cookie = session_cookie(User.objects.create_user("운영자3", is_staff=True))
    headers = [h for h in cookie if h[0] != b"origin"]
    if origin is not None:
        headers.append((b"origin", origin))

    async def scenario() -> bool:
        communicator, (connected, _) = await connect(headers)
        await communicator.disconnect()
        return bool(connected)

    assert asyncio.run(scenario()) is False


def test_allowed_origins_never_include_a_wildcard(settings: Any) -> None:
    from telemetry.routing import allowed_origins

    settings.ALLOWED_HOSTS = ["*", "limiter.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://limiter.example.com"]
    assert allowed_origins() == ["limiter.example.com", "https://limiter.example.com"]
    settings.ALLOWED_HOSTS, settings.DEBUG = ["*"], True
    assert "*" not in allowed_origins() and "localhost" in allowed_origins()
