"""What each kind of model server offers the gateway beyond the OpenAI routes.

Every upstream answers `/v1/chat/completions`, `/v1/completions` and `/v1/models`; the rest
differs, and asking a server for what it does not have only fills logs with 404s (or, for
readiness, takes every gateway out of a load balancer):

| kind | liveness | metrics | native load | abort | tokenize |
| --- | --- | --- | --- | --- | --- |
| sglang | /health | sglang:* | /get_server_info, /get_load | /abort_request | /v1/tokenize |
| vllm | /health | vllm:* | – | (close) | /tokenize |
| llama.cpp | /v1/models | – | – | (close) | – |
| openai (generic) | /v1/models | – | – | (close) | – |

"(close)": closing the connection is the only abort; /abort_request takes SGLang's `rid`.

llama.cpp's own `llama-server` has a /health, but llama-cpp-python's server (what the issue
measured) does not; /v1/models answers on both. A served model set to "auto" is detected from
/v1/models' `owned_by`: SGLang says "sglang", vLLM "vllm", llama-server "llamacpp"; anything else
is a generic OpenAI-compatible server. Sources: sglang `serving_models`/`protocol.py`
(`ModelCard.owned_by = "sglang"`), vllm `entrypoints/openai/protocol.py` (`owned_by = "vllm"`),
llama.cpp `tools/server/server.cpp` (`"owned_by": "llamacpp"`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
SGLANG = "sglang"
VLLM = "vllm"
LLAMA_CPP = "llama.cpp"
OPENAI = "openai"
MODELS_PATH = "/v1/models"
# How long a detected kind is trusted before /v1/models is read again (a server replaced by
# another kind behind the same address is picked up within this).
DETECTED_TTL_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Traits:
    liveness_path: str  # GET; 200 means up
    metrics: str  # whose metric names /metrics has: "sglang", "vllm", or "" (no /metrics)
    native_load: bool  # SGLang's /get_server_info and /get_load
    abort_path: str  # POST {"rid": …}; "": closing the connection is the only abort
    tokenize_path: str  # "": none


TRAITS: dict[str, Traits] = {
    SGLANG: Traits("/health", SGLANG, True, "/abort_request", "/v1/tokenize"),
    VLLM: Traits("/health", VLLM, False, "", "/tokenize"),
    LLAMA_CPP: Traits(MODELS_PATH, "", False, "", ""),
    OPENAI: Traits(MODELS_PATH, "", False, "", ""),
}
_OWNERS = {"sglang": SGLANG, "vllm": VLLM, "llamacpp": LLAMA_CPP, "llama.cpp": LLAMA_CPP}


def traits(kind: str) -> Traits:
    """A kind's traits; an unknown kind gets the generic server's (it asks for the least)."""
    return TRAITS.get(kind, TRAITS[OPENAI])


def kind_from_models(payload: Any) -> str:
    """The kind a `/v1/models` answer tells: its models' `owned_by`."""
    data = payload.get("data") if isinstance(payload, dict) else None
    for card in data if isinstance(data, list) else ():
        owner = card.get("owned_by") if isinstance(card, dict) else None
        if isinstance(owner, str) and owner.lower() in _OWNERS:
            return _OWNERS[owner.lower()]
    return OPENAI


def model_ids(payload: Any) -> list[str]:
    data = payload.get("data") if isinstance(payload, dict) else None
    return [
        str(card["id"])
        for card in (data if isinstance(data, list) else ())
        if isinstance(card, dict) and isinstance(card.get("id"), str)
    ]


class DetectedKinds:
    """The kinds learnt from /v1/models, per upstream URL, for models set to "auto"."""

    def __init__(self, ttl: float = DETECTED_TTL_SECONDS) -> None:
        self._ttl = ttl
        self._kinds: dict[str, tuple[str, float]] = {}

    def kind(self, url: str, configured: str) -> str | None:
        """The kind to use for `url`; None: "auto" and not detected (yet, or any more)."""
        if configured != AUTO:
            return configured
        found = self._kinds.get(url)
        if found is None or found[1] < time.monotonic():
            return None
        return found[0]

    def learn(self, url: str, kind: str) -> None:
        self._kinds[url] = (kind, time.monotonic() + self._ttl)


def load_ranks(load: Any) -> list[dict[str, Any]]:
    """SGLang's load, one object per data-parallel rank: /get_load answers a list, /v1/loads
    `{"loads": [...]}`, older releases a single object. Anything else: no ranks."""
    if isinstance(load, dict):
        load = load.get("loads", [load])
    if not isinstance(load, list):
        return []
    return [rank for rank in load if isinstance(rank, dict)]


def upstreams(models: Any) -> dict[str, str]:
    """Each distinct upstream URL of `models` (objects with upstream_kind and `servers()`, every
    server of the model) with its configured kind; when models on one URL disagree, a set kind
    wins over "auto"."""
    found: dict[str, str] = {}
    for model in models:
        kind = model.upstream_kind or AUTO
        for url in model.servers():
            if found.get(url, AUTO) == AUTO:
                found[url] = kind
    return found
