from django.urls import path

from telemetry.consumers import StatsConsumer

websocket_urlpatterns = [path("ws/stats/", StatsConsumer.as_asgi())]
