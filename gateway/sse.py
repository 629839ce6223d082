"""Server-sent events from the upstream: split into events, spot usage, recover generated text.

The relay forwards each event's bytes unchanged; it only parses the few events that can carry
usage (a substring test first, so ordinary content chunks are never decoded on the hot path).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

_EVENT_END = re.compile(rb"\r?\n\r?\n")
# Inside JSON strings quotes are escaped, so these match keys only; `"usage": null` (on every
# chunk of some servers) does not match and costs no parse.
_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_HAS_ERROR = re.compile(rb'"error"\s*:\s*\{')
DONE = b"data: [DONE]"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_payload(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details") or {}
        return cls(
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
            cached_tokens=_int(details.get("cached_tokens") if isinstance(details, dict) else 0),
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class EventSplitter:
    """Feeds raw network chunks in, yields complete SSE events (without the blank line)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        parts = _EVENT_END.split(buffer)
        self._buffer = parts.pop()
        return [p for p in parts if p]

    def rest(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest


@dataclass(slots=True)
class StreamAccount:
    """What one relayed stream generated, gathered as events pass by."""

    usage: Usage | None = None
    content_events: list[bytes] = field(default_factory=list)
    saw_done: bool = False
    error: str = ""
    _counted: int = 0  # content events already looked at by output_pieces
    _pieces: int = 0

    def inspect(self, event: bytes) -> bool:
        """Record the event; returns False for a usage-only chunk (the caller may drop it)."""
        if event.startswith(DONE):
            self.saw_done = True
            return True
        if _HAS_USAGE.search(event):
            payload = _payload(event)
            usage = Usage.from_payload(payload.get("usage")) if payload else None
            if usage is not None:
                self.usage = usage
                if payload is not None and payload.get("choices") == []:
                    return False
        if _HAS_ERROR.search(event):
            payload = _payload(event)
            if payload and isinstance(payload.get("error"), dict):
                self.error = str(payload["error"].get("type") or "upstream_error")
        self.content_events.append(event)
        return True

    def last_payload(self) -> dict[str, Any]:
        """The last chunk with choices (its id, model, created and object), or {}."""
        for event in reversed(self.content_events):
            payload = _payload(event)
            if payload and "choices" in payload:
                return payload
        return {}

    def generated_text(self) -> str:
        """The text of every choice, for counting when the upstream reported no usage."""
        pieces: list[str] = []
        for event in self.content_events:
            pieces.extend(_texts(_payload(event)))
        return "".join(pieces)

    def output_pieces(self) -> int:
        """Non-empty text pieces streamed so far: a lower bound of the tokens generated (SGLang
        sends each decoded token as its own piece, or several in one). Parses only the events
        since the last call: the write-ahead checkpoint asks every few seconds."""
        for event in self.content_events[self._counted :]:
            self._pieces += sum(1 for text in _texts(_payload(event)) if text)
        self._counted = len(self.content_events)
        return self._pieces


def _texts(payload: dict[str, Any] | None) -> Iterator[str]:
    """The generated text pieces of one chunk: content (or completion text) and reasoning."""
    if not payload:
        return
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str):
            yield text
        reasoning = delta.get("reasoning_content") if isinstance(delta, dict) else None
        if isinstance(reasoning, str):
            yield reasoning


def _payload(event: bytes) -> dict[str, Any] | None:
    data = b"".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))
    if not data or data == b"[DONE]":
        return None
    payload = _loads(data)
    return payload if isinstance(payload, dict) else None


def _loads(data: bytes) -> Any:
    # orjson (3-4x faster) for what SGLang sends; the standard library for what orjson refuses
    # but an upstream may still send (NaN, lone surrogates); None for what is not JSON at all.
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except ValueError:
        return None


def response_usage(body: bytes) -> tuple[Usage | None, str]:
    """Usage and generated text of a non-streaming response."""
    payload = _loads(body)
    if not isinstance(payload, dict):
        return None, ""
    usage = Usage.from_payload(payload.get("usage"))
    texts: list[str] = []
    for choice in payload.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str):
                texts.append(text)
    return usage, "".join(texts)


def usage_payload(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def usage_chunk(like: dict[str, Any], usage: Usage) -> bytes:
    """A final usage chunk shaped like OpenAI's (empty choices), after the stream's own chunks;
    `usage_source: "gateway"` says the gateway counted it."""
    kind = like.get("object")
    return orjson.dumps(
        {
            "id": like.get("id") if isinstance(like.get("id"), str) else "",
            "object": kind if isinstance(kind, str) else "chat.completion.chunk",
            "created": like.get("created") if isinstance(like.get("created"), int) else 0,
            "model": like.get("model") if isinstance(like.get("model"), str) else "",
            "choices": [],
            "usage": usage_payload(usage),
            "usage_source": "gateway",
        }
    )


def with_usage(body: bytes, usage: Usage) -> bytes:
    """A whole response with the gateway's usage added (it had none); unchanged if not JSON."""
    payload = _loads(body)
    if not isinstance(payload, dict):
        return body
    payload["usage"] = usage_payload(usage)
    payload["usage_source"] = "gateway"
    return orjson.dumps(payload)
