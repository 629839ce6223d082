"""The ledger row: its one schema, how it travels (spool line, Redis stream entry) and how it
is fitted to the ledger's columns.

`UsageRow` is the schema: named fields, the same names as the UsageRecord columns (a test holds
the two together), and a version. On the wire a row is a JSON object with `"v"` and the field
names, so a reader never depends on positions: a row from an older writer (missing fields) gets
the defaults, a row from a newer one (extra fields) keeps the fields this version knows, and
positional lists, which gateways wrote before the schema had names, are read by their frozen
legacy order. Nothing is ever shifted into the wrong column; what is not a row is dead-lettered.

Every value that reaches a row came from outside at some point (an upstream's error type, a
client's model name, a count an upstream reported), so `clean_row` fits each value to its
column: strings cut to the column's length with NUL bytes and unencodable surrogates removed,
integers into the column's range, floats finite, unknown enum values to a fallback. The gateway
applies it where the row is built and the writer again at the write site, so that a row from
an older or newer gateway (a rolling deploy) cannot stop the ledger either. What still cannot
be written goes to the dead-letter table (quotas/services.py), never back into the batch.

No Django imports: the gateway's hot path imports this module.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

SCHEMA_VERSION = 1


@dataclass(slots=True)
class UsageRow:
    """One request's line in the ledger (quotas.models.UsageRecord, column for column)."""

    request_id: str
    user_id: int | None
    api_key_id: int | None
    model: str
    endpoint: str
    status_code: int
    streamed: bool
    started_at: float  # epoch seconds
    finished_at: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    estimated_prompt_tokens: int = 0  # the gateway's own count of the prompt
    usage_source: str = "none"
    error_type: str = ""
    client_disconnected: bool = False
    upstream_latency_ms: float | None = None
    time_to_first_token_ms: float | None = None
    upstream: str = ""  # the server that answered (a model may have several)


FIELDS = tuple(dataclasses.fields(UsageRow))
# The order of the tuples the writer inserts (quotas/services.py).
LEDGER_COLUMNS = tuple(f.name for f in FIELDS)
REQUIRED = frozenset(f.name for f in FIELDS if f.default is dataclasses.MISSING)
DEFAULTS = {f.name: f.default for f in FIELDS if f.default is not dataclasses.MISSING}
# The positional rows gateways wrote before version 1 (spool files and stream entries may
# still hold them during an upgrade). Frozen: never edit, never reorder.
LEGACY_COLUMNS = (
    "request_id", "user_id", "api_key_id", "model", "endpoint", "prompt_tokens",
    "completion_tokens", "cached_tokens", "estimated_prompt_tokens", "usage_source",
    "status_code", "error_type", "streamed", "client_disconnected", "started_at", "finished_at",
    "upstream_latency_ms", "time_to_first_token_ms",
)  # fmt: skip
STARTED_AT = LEDGER_COLUMNS.index("started_at")
FINISHED_AT = LEDGER_COLUMNS.index("finished_at")
API_KEY_ID = LEDGER_COLUMNS.index("api_key_id")


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


def named(raw: Any) -> dict[str, Any]:
    """A transported row as field → value, by name; BadRow if it is not a ledger row at all."""
    if isinstance(raw, Mapping):
        version = raw.get("v")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BadRow(f"a ledger row needs a schema version, not {version!r}")
        values = {name: raw[name] for name in LEDGER_COLUMNS if name in raw}
    elif isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        if len(raw) != len(LEGACY_COLUMNS):
            raise BadRow(
                f"a positional ledger row has {len(LEGACY_COLUMNS)} values, this one {len(raw)}"
            )
        values = dict(zip(LEGACY_COLUMNS, raw, strict=True))
    else:
        raise BadRow(f"a ledger row is an object, not {type(raw).__name__}")
    missing = REQUIRED - values.keys()
    if missing:
        raise BadRow(f"a ledger row needs {', '.join(sorted(missing))}")
    return {**DEFAULTS, **values}


def clean_row(raw: Any, now: Callable[[], float]) -> tuple[Any, ...]:
    """`raw` (a UsageRow, or a row as transported) fitted to the ledger's columns, as a tuple
    in LEDGER_COLUMNS order; BadRow if it is not a ledger row at all."""
    if isinstance(raw, UsageRow):
        return _fit(*_values_of(raw), now=now)  # the request path: no dict in between
    row = named(raw)
    return _fit(*(row[name] for name in LEDGER_COLUMNS), now=now)


_values_of = operator.attrgetter(*LEDGER_COLUMNS)


def _fit(
    request_id: Any, user_id: Any, api_key_id: Any, model: Any, endpoint: Any,
    status_code: Any, streamed: Any, started_at: Any, finished_at: Any, prompt_tokens: Any,
    completion_tokens: Any, cached_tokens: Any, estimated_prompt_tokens: Any,
    usage_source_: Any, error_type: Any, client_disconnected: Any, upstream_latency_ms: Any,
    time_to_first_token_ms: Any, upstream: Any, *, now: Callable[[], float],
) -> tuple[Any, ...]:  # fmt: skip
    # Parameters in LEDGER_COLUMNS order (the UsageRow fields); the tuple comes back the same.
    request_id = text(request_id, 64)
    if not request_id:
        raise BadRow("a ledger row needs a request id")
    prompt = integer(prompt_tokens, INT_MAX)
    completion = integer(completion_tokens, INT_MAX)
    finished = epoch(finished_at, 0.0) or now()
    return (
        request_id,
        optional_id(user_id),
        optional_id(api_key_id),
        text(model, 200),
        text(endpoint, 40),
        integer(status_code, SMALLINT_MAX),
        bool(streamed),
        epoch(started_at, finished),
        finished,
        prompt,
        completion,
        integer(cached_tokens, INT_MAX),
        integer(estimated_prompt_tokens, INT_MAX),
        usage_source(usage_source_, prompt + completion),
        text(error_type, 60),
        bool(client_disconnected),
        milliseconds(upstream_latency_ms),
        milliseconds(time_to_first_token_ms),
        text(upstream, 300),
    )


_WIRE_KEYS = ("v", *LEDGER_COLUMNS)


def wire_line(values: tuple[Any, ...]) -> bytes:
    """Fitted values (clean_row's tuple) as the line the spool and the stream carry."""
    return orjson.dumps(dict(zip(_WIRE_KEYS, (SCHEMA_VERSION, *values), strict=True)))


def request_id_of(raw: Any) -> str:
    """The request id of something that was meant to be a row, for the dead-letter list."""
    if isinstance(raw, Mapping):
        return text(raw.get("request_id"), 64)
    if isinstance(raw, (list, tuple)) and raw:
        return text(raw[0], 64)
    return ""
