"""`/ws/stats/` behind the same stack as limiter_site/asgi.py (OriginValidator + sessions +
auth): who may connect, and the periodic re-check that cuts off a staff member who is
deactivated, loses is_staff or logs out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import OriginValidator
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.db.backends.utils import CursorWrapper
from django.test import Client

from gateway.stats import STATS_GROUP
from telemetry.consumers import FORBIDDEN
from telemetry.routing import allowed_origins, websocket_urlpatterns

pytestmark = pytest.mark.django_db(transaction=True)
RECHECK = 0.2
DEADLINE = 5.0


@pytest.fixture(autouse=True)
def fast_recheck(settings: Any) -> None:
    settings.STATS_RECHECK_SECONDS = RECHECK
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.ALLOWED_HOSTS = ["testserver"]


def application() -> Any:
    return OriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)), allowed_origins())


def browser(user: User | None, origin: bytes | None = b"http://testserver") -> tuple[Any, list]:
    client = Client()
    headers: list[tuple[bytes, bytes]] = []
    if user is not None:
        client.force_login(user)
        headers.append((b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()))
    if origin is not None:
        headers.append((b"origin", origin))
    return client, headers


def staff_member(name: str = "운영자") -> User:
    return User.objects.create_user(name, password="pw-console-1", is_staff=True)


def run(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(scenario())


async def open_socket(headers: list) -> tuple[WebsocketCommunicator, bool, Any]:
    communicator = WebsocketCommunicator(application(), "/ws/stats/", headers=headers)
    connected, code = await communicator.connect(timeout=DEADLINE)
    return communicator, connected, code


@pytest.mark.parametrize("who", ["anonymous", "not staff", "inactive staff"])
def test_only_active_staff_may_connect(who: str) -> None:
    user = None
    if who == "not staff":
        user = User.objects.create_user("사용자")
    elif who == "inactive staff":
        user = staff_member()
    _, headers = browser(user)
    if who == "inactive staff":
        assert user is not None
        User.objects.filter(pk=user.pk).update(is_active=False)

    async def scenario() -> tuple[bool, Any]:
        communicator, connected, code = await open_socket(headers)
        await communicator.disconnect()
        return connected, code

    assert run(scenario) == (False, FORBIDDEN)


@pytest.mark.parametrize("origin", [b"http://evil.example", b"null", None])
def test_a_foreign_origin_is_refused_even_for_staff(origin: bytes | None) -> None:
    _, headers = browser(staff_member(), origin)

    async def scenario() -> bool:
        communicator, connected, _ = await open_socket(headers)
        await communicator.disconnect()
        return connected

    assert run(scenario) is False
    # The same staff member from our own origin gets in: the refusal was the origin's.
    _, good = browser(User.objects.get(username="운영자"))

    async def own_origin() -> bool:
        communicator, connected, _ = await open_socket(good)
        await communicator.disconnect()
        return connected

    assert run(own_origin) is True


def lose_is_staff(user: User, client: Client) -> None:
    User.objects.filter(pk=user.pk).update(is_staff=False)


def deactivate(user: User, client: Client) -> None:
    User.objects.filter(pk=user.pk).update(is_active=False)


def log_out(user: User, client: Client) -> None:
    client.logout()
    assert not Session.objects.exists()


def change_password(user: User, client: Client) -> None:
    user.set_password("another-pw-2")
    user.save()


@pytest.mark.parametrize("change", [lose_is_staff, deactivate, log_out, change_password])
def test_the_feed_is_cut_off_when_permission_is_lost(
    change: Callable[[User, Client], None],
) -> None:
    user = staff_member()
    client, headers = browser(user)

    async def scenario() -> dict[str, Any]:
        communicator, connected, _ = await open_socket(headers)
        assert connected
        # Still allowed after a few re-checks: messages keep coming.
        await asyncio.sleep(RECHECK * 3)
        assert await communicator.receive_nothing(timeout=0.05)
        await sync_to_async(change)(user, client)
        started = time.monotonic()
        closed = await communicator.receive_output(timeout=DEADLINE)
        assert time.monotonic() - started < DEADLINE
        await communicator.disconnect()
        return closed

    closed = run(scenario)
    assert closed == {"type": "websocket.close", "code": FORBIDDEN}


def test_messages_are_relayed_without_database_queries(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from channels.layers import get_channel_layer

    settings.STATS_RECHECK_SECONDS = 60  # no re-check during the test
    user = staff_member()
    _, headers = browser(user)

    async def scenario() -> list[dict[str, Any]]:
        communicator, connected, _ = await open_socket(headers)
        assert connected
        layer = get_channel_layer()
        summary = {"process": "h:1", "requests_per_second": 2.0, "errors_per_second": 0.5}
        received = []
        # Any thread's query (the consumer's would run in a worker thread) goes through here.
        executed: list[str] = []
        real = CursorWrapper.execute

        def counted(self: CursorWrapper, sql: str, *args: Any, **kwargs: Any) -> Any:
            executed.append(sql)
            return real(self, sql, *args, **kwargs)

        monkeypatch.setattr(CursorWrapper, "execute", counted)
        for _ in range(5):
            await layer.group_send(STATS_GROUP, {"type": "stats.gateway", "summary": summary})
            received.append(await communicator.receive_json_from(timeout=DEADLINE))
        monkeypatch.undo()
        await communicator.disconnect()
        assert executed == []
        return received

    received = run(scenario)
    assert len(received) == 5 and received[0]["kind"] == "gateway"
    assert received[0]["errors_per_second"] == 0.5


def test_a_gateway_summary_counts_errors_apart_from_429s() -> None:
    from gateway.stats import StatsPublisher

    stats = StatsPublisher()
    for status, tokens in ((200, 15), (200, 5), (429, 0), (502, 0), (499, 0), (400, 0)):
        stats.count(status, tokens)
    summary = stats.summary(2.0)
    assert summary["requests_per_second"] == 3.0 and summary["tokens_per_second"] == 10.0
    assert summary["rate_limited_per_second"] == 0.5
    assert summary["errors_per_second"] == 1.5
    assert stats.summary(1.0)["errors_per_second"] == 0.0  # the tallies start again
