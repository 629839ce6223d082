"""ASGI entry point: `daphne -b 127.0.0.1 -p 8080 limiter_site.asgi:application`.

`/v1/…` and `/health` go straight to the gateway's raw ASGI app; everything else is Django.
"""

import gc
import os

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
django_app = get_asgi_application()

from gateway.app import Gateway  # noqa: E402  (needs Django set up first)
from gateway.mount import mount_gateway, refuse_insecure_settings  # noqa: E402
from telemetry.routing import websocket_urlpatterns  # noqa: E402

refuse_insecure_settings()
gateway = Gateway()
application = ProtocolTypeRouter(
    {
        "http": mount_gateway(gateway, django_app),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
        "lifespan": gateway,
    }
)

# Everything imported so far (Django, transformers, the tokenizer) lives as long as the
# process: keep it out of the garbage collector's full passes, whose stalls set the p99 tail
# (LiteLLM's 0.4 s stalls, ../shared/reference/peers.md).
gc.collect()
gc.freeze()
