"""Log records that say which request they belong to, and never carry a secret.

`request_id` is a context variable: the gateway sets it for each API request (the id it also
returns as `x-request-id` and writes in the ledger row) and Django's middleware for each page,
so a line logged anywhere under that request, in any module, carries it. Outside a request it
is "-".

Formatters (`PlainFormatter`, `JsonFormatter`; LOG_FORMAT picks one, limiter_site/settings.py)
redact the finished line, traceback included: API keys (`sk-…`, operator tokens `op-…`),
bearer credentials, passwords in URLs (`postgres://user:pass@…`) and `password=`/`secret=`
pairs. Redacting the output rather than trusting every call site is the point: an exception
message from a library (a database driver quoting its DSN) is not ours to review.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from datetime import datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

request_id: ContextVar[str] = ContextVar("request_id", default="-")

_SECRETS = (
    # API keys and operator tokens: the prefix and the last 4 characters stay (what the admin
    # shows), the rest goes.
    (re.compile(r"\b((?:sk|op)-)[A-Za-z0-9_\-]{8,}([A-Za-z0-9_\-]{4})\b"), r"\1****\2"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}"), r"\1 [redacted]"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^:/@\s\"']+):[^@\s\"']+@"), r"\1:[redacted]@"),
    # `password=…`, `"secret": "…"`, also at the end of a name (EMAIL_HOST_PASSWORD=…).
    (
        re.compile(
            r"(?i)(?<![a-z0-9])(password|passwd|secret|secret_key|token|api_key)"
            r"([\"']?\s*[=:]\s*[\"']?)[^\s\"',&}]+"
        ),
        r"\1\2[redacted]",
    ),
)


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the handler's filter, so records of every logger get it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(_JsonFormatter):
    """One JSON object a line: time, level, logger, message, request_id (and exc_info)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault(
            "rename_fields", {"asctime": "time", "levelname": "level", "name": "logger"}
        )
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__(*args, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        # uvicorn's copy of the message with terminal colour codes: noise in a log pipeline.
        record.__dict__.pop("color_message", None)
        return redact(super().format(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # ISO 8601 with the offset (Django sets the process's zone: +09:00), for log pipelines.
        moment = datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(timespec="milliseconds")
