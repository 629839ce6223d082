"""`/ws/stats/`: a once-a-second summary for staff users, for the operator console.

Gateway processes publish their own numbers every second (gateway/stats.py) and the SGLang
scrape publishes the GPU side; both reach every connected staff browser through the channel
layer's `stats` group (Redis in production, in memory in the single-process quick start).

Who may listen is checked on connect (the session's user, staff and active; the origin is
checked before, by limiter_site/asgi.py's OriginValidator) and again every
STATS_RECHECK_SECONDS: a socket outlives the page load, so a staff member who is deactivated,
loses is_staff or logs out elsewhere is cut off within that interval (close code 4403). The
messages themselves never touch the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import SimpleNamespace
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib import auth
from django.contrib.sessions.backends.base import SessionBase
from django.utils.module_loading import import_string

from gateway.stats import STATS_GROUP

log = logging.getLogger(__name__)
FORBIDDEN = 4403  # websocket close codes 4000-4999 are the application's


def recheck_seconds() -> float:
    return float(settings.STATS_RECHECK_SECONDS)


def may_watch(user: Any) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)


def still_allowed(session_key: str | None, user_id: int) -> bool:
    """Is the session `session_key` still logged in as staff user `user_id`? Read fresh: the
    session from its store (gone after a logout; its auth hash stale after a password change)
    and the user from the database (deactivated, no longer staff)."""
    if not session_key:
        return False
    store: SessionBase = import_string(f"{settings.SESSION_ENGINE}.SessionStore")(session_key)
    # django.contrib.auth.get_user wants only `.session` of a request.
    user = auth.get_user(SimpleNamespace(session=store))  # type: ignore[arg-type]
    return may_watch(user) and user.pk == user_id


class StatsConsumer(AsyncJsonWebsocketConsumer):
    _recheck: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if not may_watch(user):
            await self.close(code=FORBIDDEN)
            return
        assert user is not None
        session = self.scope.get("session")
        self._session_key: str | None = getattr(session, "session_key", None)
        self._user_id: int = user.pk
        await self.channel_layer.group_add(STATS_GROUP, self.channel_name)
        await self.accept()
        self._recheck = asyncio.ensure_future(self._keep_checking())

    async def disconnect(self, code: int) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck
        await self.channel_layer.group_discard(STATS_GROUP, self.channel_name)

    async def _keep_checking(self) -> None:
        check = database_sync_to_async(still_allowed)
        while True:
            await asyncio.sleep(recheck_seconds())
            try:
                allowed = await check(self._session_key, self._user_id)
            except Exception:
                # Cannot tell (database down): fail closed; the page reconnects, and connect
                # checks again.
                log.warning("could not re-check a stats listener", exc_info=True)
                allowed = False
            if not allowed:
                await self.channel_layer.group_discard(STATS_GROUP, self.channel_name)
                await self.close(code=FORBIDDEN)
                return

    async def stats_gateway(self, event: dict[str, Any]) -> None:
        await self.send_json({"kind": "gateway", **event["summary"]})

    async def stats_sglang(self, event: dict[str, Any]) -> None:
        await self.send_json({"kind": "sglang", **event["summary"]})
