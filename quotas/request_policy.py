"""What a plan lets its clients send upstream beyond the standard request fields.

The gateway forwards an allowlist (gateway/request_schema.py): the OpenAI parameters SGLang
supports plus a few safe SGLang sampling extensions. Everything else is refused unless an
operator enables it for a plan ("extra request fields"). Some SGLang fields are never a client's
to set, whatever the plan says: the gateway sets them itself, or they reach past the gateway
(server-side code, KV transfer to a host of the client's choice, the prompt the gateway counted).
Field names follow SGLang's request models, python/sglang/srt/entrypoints/openai/protocol.py
(ChatCompletionRequest, CompletionRequest; read at commit 004c82e0).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.utils.translation import gettext

# Never accepted from a client, with the reason the gateway gives.
GATEWAY_OWNED_FIELDS: dict[str, str] = {
    "rid": "the gateway sends its own request id upstream",
    "priority": "the priority comes from the plan",
    "cache_salt": "prefix-cache isolation is a plan setting",
    "input_ids": "it would replace the prompt the gateway counted",
    "custom_logit_processor": "it runs code on the model server",
    "custom_params": "it only feeds custom logit processors",
    "bootstrap_host": "it directs KV-cache transfer inside the model server",
    "bootstrap_port": "it directs KV-cache transfer inside the model server",
    "bootstrap_room": "it directs KV-cache transfer inside the model server",
    "routed_dp_rank": "routing inside the model server is the operator's",
    "data_parallel_rank": "routing inside the model server is the operator's",
    "disagg_prefill_dp_rank": "routing inside the model server is the operator's",
}
# Core fields, and lora_path: an adapter is checked against the model's and the plan's lists.
NOT_ENABLEABLE = frozenset(GATEWAY_OWNED_FIELDS) | {"model", "messages", "prompt", "lora_path"}

# SGLang fields a plan may enable; the gateway checks each one's type before forwarding.
# Any other name an operator enables is forwarded as a JSON value of bounded depth.
OPERATOR_EXTENSIONS = (
    "ignore_eos",
    "stop_regex",
    "return_hidden_states",
    "return_routed_experts",
    "return_token_ids",
    "return_prompt_token_ids",
    "return_meta_info",
    "return_cached_tokens_details",
    "custom_labels",
    "extra_key",
    "session_id",
    "session_params",
    "images_config",
    "max_dynamic_patch",
    "min_dynamic_patch",
    "use_audio_in_video",
)
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class RequestAccess:
    """A plan's request policy, cached with each key (see quotas.services.KeyGrant)."""

    extra_fields: frozenset[str] = frozenset()
    priority: int | None = None  # sent as SGLang's `priority` when set
    cache_salt: str | None = None  # sent as SGLang's `cache_salt`: one prefix cache per user
    fair_share_weight: int = 1  # the fair queue's weight (tokenlimit/fair_queue.py)
    max_queue_seconds: float = 30.0  # the longest wait in the fair queue; 0: never wait


def validate_extra_fields(names: object) -> None:
    """Model-field validator for Plan.extra_request_fields."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValidationError(gettext('Enter a list of field names, e.g. ["ignore_eos"].'))
    bad = sorted(n for n in names if not FIELD_NAME.fullmatch(n))
    if bad:
        message = gettext("Not a request field name: %(names)s")
        raise ValidationError(message % {"names": ", ".join(bad)})
    owned = sorted(n for n in names if n in NOT_ENABLEABLE)
    if owned:
        message = gettext("These fields are set or checked by the gateway itself: %(names)s")
        raise ValidationError(message % {"names": ", ".join(owned)})


def user_cache_salt(secret: str, user_id: int) -> str:
    """A salt no client can guess or choose, stable per user across gateway replicas."""
    digest = hmac.new(secret.encode(), f"cache-salt:{user_id}".encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def model_allowed(allowed: Sequence[str], names: Sequence[str], adapter: str | None) -> bool:
    """Whether a plan's `allowed_models` lets a client use the model called `names` (its name
    and aliases), or one of its LoRA adapters: models by name or alias, adapters as
    "model:adapter" or "model:*"; an empty list allows everything. The gateway applies it to
    every request; the REST API lists the models it allows."""
    if not allowed:
        return True
    if adapter is None:
        return any(name in allowed for name in names)
    return any(f"{name}:{adapter}" in allowed or f"{name}:*" in allowed for name in names)
