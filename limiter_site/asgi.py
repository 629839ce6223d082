"""ASGI entry point: `uvicorn --host 127.0.0.1 --port 8080 limiter_site.asgi:application`.

`/v1/…`, `/health` and `/metrics` go straight to the gateway's raw ASGI app; everything else
is Django; websockets (`/ws/…`) only from our own origins.
"""

import gc
import os
import sys

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import OriginValidator
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
django_app = get_asgi_application()

from gateway.app import Gateway  # noqa: E402  (needs Django set up first)
from gateway.mount import mount_gateway, refuse_insecure_settings  # noqa: E402
from telemetry.routing import allowed_origins, websocket_urlpatterns  # noqa: E402

refuse_insecure_settings()
gateway = Gateway()
application = ProtocolTypeRouter(
    {
        "http": mount_gateway(gateway, django_app),
        "websocket": OriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns)), allowed_origins()
        ),
        "lifespan": gateway,
    }
)

# Worker threads (chat templates, tokenizer wrappers) share the GIL with the event loop; a thread
# holding it is made to let go after this long. With CPython's 5 ms default one runaway template
# delayed every other request by about 45 ms; with 1 ms, by about 10 (tests/gateway/
# test_hostile.py; docs/benchmarks.md has the throughput side).
sys.setswitchinterval(0.001)

# Everything imported so far (Django, transformers, the tokenizer) lives as long as the
# process: keep it out of the garbage collector's full passes, whose stalls set the p99 tail
# (LiteLLM's users report 0.4 s stalls from them).
gc.collect()
gc.freeze()
