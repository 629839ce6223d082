"""OpenAI-shaped error bodies, the only kind of error a client ever sees from the gateway."""

from __future__ import annotations

import json
from typing import Any

import orjson


class GatewayError(Exception):
    """Raised anywhere on the request path; turned into one JSON error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


# Messages quote client values (a model name, a parameter): long ones are cut.
MAX_MESSAGE_CHARS = 2000


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> bytes:
    payload = {
        "error": {
            "message": _printable(message)[:MAX_MESSAGE_CHARS],
            "type": _printable(type_),
            "param": _printable(param) if param is not None else None,
            "code": _code(code),
        }
    }
    return orjson.dumps(payload)


def _code(code: Any) -> int | str | None:
    if isinstance(code, int) and not isinstance(code, bool) and abs(code) < 2**53:
        return code
    if isinstance(code, str) and code:
        return _printable(code)[:100]
    return None


def _printable(text: str) -> str:
    # Lone surrogates cannot be encoded as UTF-8 (the body would fail to build): replace them.
    return text.encode("utf-8", "replace").decode("utf-8")


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def rewrite_upstream_error(status: int, raw: bytes) -> bytes:
    """Turn SGLang's flat `{"object": "error", ...}` (or a non-OpenAI body) into OpenAI's shape."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return raw  # already OpenAI's shape
    if isinstance(data, dict) and "message" in data:
        return error_body(
            str(data.get("message")),
            _upstream_type(status, data.get("type")),
            data.get("param") if isinstance(data.get("param"), str) else None,
            data.get("code"),
        )
    text = raw.decode("utf-8", errors="replace").strip()[:500] or f"HTTP {status}"
    return error_body(
        f"The upstream model server answered {status}: {text}", "upstream_error", None, status
    )


def _upstream_type(status: int, upstream_type: Any) -> str:
    # SGLang names Python exception classes ("BadRequestError"); clients branch on OpenAI's types.
    if status in (400, 404, 413, 422):
        return "invalid_request_error"
    if isinstance(upstream_type, str) and upstream_type and not upstream_type.endswith("Error"):
        return upstream_type
    return "upstream_error"
