"""The ledger row as it travels (spool line, Redis stream entry) and its normalisation.

A row is a tuple in LEDGER_COLUMNS order with times as epoch seconds. Every value that reaches
a row came from outside at some point (an upstream's error type, a client's model name, a
count an upstream reported), so `clean_row` fits each value to its column: strings cut to the
column's length with NUL bytes and unencodable surrogates removed, integers into the column's
range, floats finite, unknown enum values to a fallback. The gateway applies it where the
event is built and the writer again at the write site, so that a row from an older or newer
gateway (a rolling deploy) cannot stop the ledger either. What still cannot be written goes to
the dead-letter table (quotas/services.py), never back into the batch.

No Django imports: the gateway's hot path imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

# Column order of ledger rows (the UsageRecord columns the writer fills).
LEDGER_COLUMNS = (
    "request_id",
    "user_id",
    "api_key_id",
    "model",
    "endpoint",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "estimated_prompt_tokens",
    "usage_source",
    "status_code",
    "error_type",
    "streamed",
    "client_disconnected",
    "started_at",
    "finished_at",
    "upstream_latency_ms",
    "time_to_first_token_ms",
)
STARTED_AT = LEDGER_COLUMNS.index("started_at")
FINISHED_AT = LEDGER_COLUMNS.index("finished_at")
API_KEY_ID = LEDGER_COLUMNS.index("api_key_id")
REQUEST_ID = LEDGER_COLUMNS.index("request_id")

# Column bounds, as in quotas/models.py (PositiveIntegerField, BigAutoField, …).
INT_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1
SMALLINT_MAX = 2**15 - 1
LATEST_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z, the last instant a datetime can hold
LONGEST_MS = 1e12  # about 31 years: anything longer is a broken clock, not a latency

USAGE_SOURCES = frozenset({"upstream", "gateway", "none", "checkpoint"})
# Set on the row of a request whose gateway died before it finished (gateway/ledger.py).
INTERRUPTED = "interrupted"


class BadRow(ValueError):
    """A row that cannot be made to fit the ledger (wrong shape): it goes to the dead letters."""


def text(value: Any, length: int) -> str:
    if not isinstance(value, str):
        value = "" if value is None else str(value)
    if "\x00" in value:
        value = value.replace("\x00", "")  # Postgres text cannot hold NUL
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a \ud800 escape in JSON
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value[:length]


def integer(value: Any, high: int, low: int = 0) -> int:
    if isinstance(value, float):
        value = int(value) if math.isfinite(value) else 0
    elif not isinstance(value, int):  # bools are ints (0/1): fine
        try:
            value = int(str(value).strip() or 0)
        except ValueError:
            value = 0
    return min(max(value, low), high)


def optional_id(value: Any) -> int | None:
    return None if value is None else integer(value, BIGINT_MAX)


def epoch(value: Any, fallback: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return fallback
    return min(max(number, 0.0), LATEST_EPOCH) if math.isfinite(number) else fallback


def milliseconds(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return min(max(number, 0.0), LONGEST_MS) if math.isfinite(number) else None


def usage_source(value: Any, tokens: int) -> str:
    if isinstance(value, str) and value in USAGE_SOURCES:
        return value
    return "gateway" if tokens else "none"


def clean_row(row: Sequence[Any], now: Callable[[], float]) -> tuple[Any, ...]:
    """`row` fitted to the ledger's columns; BadRow if it is not a ledger row at all."""
    if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
        raise BadRow(f"a ledger row is a list, not {type(row).__name__}")
    if len(row) != len(LEDGER_COLUMNS):
        raise BadRow(f"a ledger row has {len(LEDGER_COLUMNS)} values, this one {len(row)}")
    request_id = text(row[0], 64)
    if not request_id:
        raise BadRow("a ledger row needs a request id")
    prompt, completion = integer(row[5], INT_MAX), integer(row[6], INT_MAX)
    finished = epoch(row[FINISHED_AT], 0.0) or now()
    return (
        request_id,
        optional_id(row[1]),
        optional_id(row[2]),
        text(row[3], 200),
        text(row[4], 40),
        prompt,
        completion,
        integer(row[7], INT_MAX),
        integer(row[8], INT_MAX),
        usage_source(row[9], prompt + completion),
        integer(row[10], SMALLINT_MAX),
        text(row[11], 60),
        bool(row[12]),
        bool(row[13]),
        epoch(row[STARTED_AT], finished),
        finished,
        milliseconds(row[16]),
        milliseconds(row[17]),
    )


def request_id_of(raw: Any) -> str:
    """The request id of something that was meant to be a row, for the dead-letter list."""
    if isinstance(raw, (list, tuple)) and raw:
        return text(raw[REQUEST_ID], 64)
    return ""
