"""`/ws/stats/`: a once-a-second summary for staff users, for the dashboard pages.

Gateway processes publish their own numbers every second (gateway/stats.py) and the SGLang
scrape publishes the GPU side; both reach every connected staff browser through the channel
layer's `stats` group (Redis in production, in memory in the single-process quick start).
"""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from gateway.stats import STATS_GROUP

FORBIDDEN = 4403  # websocket close codes 4000-4999 are the application's


class StatsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_staff:
            await self.close(code=FORBIDDEN)
            return
        await self.channel_layer.group_add(STATS_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(STATS_GROUP, self.channel_name)

    async def stats_gateway(self, event: dict[str, Any]) -> None:
        await self.send_json({"kind": "gateway", **event["summary"]})

    async def stats_sglang(self, event: dict[str, Any]) -> None:
        await self.send_json({"kind": "sglang", **event["summary"]})
