"""Checks for single values of a client's request body, each raising a 400 that names its param.

The body is parsed by orjson, which already refuses what JSON must not carry (NaN, Infinity,
lone surrogates, invalid UTF-8, nesting past 1,024 levels), so these checks only judge types,
ranges and shapes. Each check returns the value to forward upstream. Free-form values (JSON
schemas, tool arguments, operator-enabled extensions) are walked iteratively to a bounded depth:
a recursive walk is what a hostile body would exploit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

import orjson

from gateway.errors import GatewayError, invalid

Check = Callable[[Any, str], Any]

# Deeper than any real JSON schema or tool argument object; documented in README.
MAX_JSON_DEPTH = 64
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# OpenAI's rule for function names (a-z, A-Z, 0-9, _, -), widened to letters of any script so
# that Korean tool names work; no spaces, quotes or brackets that a tool-call parser could trip on.
FUNCTION_NAME = re.compile(r"[\w-]{1,64}")


def field_error(param: str, message: str) -> GatewayError:
    return invalid(f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def boolean(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise field_error(param, f"expected a boolean, got {type_name(value)}.")
    return value


def integer(minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> Check:
    def check(value: Any, param: str) -> int:
        # bool is an int in Python; orjson gives floats for integers beyond 64 bits.
        if isinstance(value, bool) or not isinstance(value, int):
            raise field_error(param, f"expected an integer, got {type_name(value)}.")
        if not minimum <= value <= maximum:
            raise field_error(param, f"expected an integer from {minimum} to {maximum}.")
        return value

    return check


def number(minimum: float, maximum: float, *, above_minimum: bool = False) -> Check:
    def check(value: Any, param: str) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise field_error(param, f"expected a number, got {type_name(value)}.")
        low_ok = value > minimum if above_minimum else value >= minimum
        if not (low_ok and value <= maximum):
            low = "above" if above_minimum else "from"
            raise field_error(param, f"expected a number {low} {minimum} up to {maximum}.")
        return value

    return check


def text(max_chars: int, *, allow_empty: bool = True) -> Check:
    def check(value: Any, param: str) -> str:
        if not isinstance(value, str):
            raise field_error(param, f"expected a string, got {type_name(value)}.")
        if len(value) > max_chars:
            raise field_error(param, f"longer than {max_chars} characters.")
        if not value and not allow_empty:
            raise field_error(param, "must not be empty.")
        return value

    return check


def one_of(choices: Collection[str]) -> Check:
    def check(value: Any, param: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise field_error(param, f"expected one of {', '.join(sorted(choices))}.")
        return value

    return check


def function_name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not FUNCTION_NAME.fullmatch(value):
        raise field_error(param, "expected a name of 1 to 64 letters, digits, _ or -.")
    return value


def array(item: Check, *, max_items: int, min_items: int = 0) -> Check:
    def check(value: Any, param: str) -> list[Any]:
        if not isinstance(value, list):
            raise field_error(param, f"expected an array, got {type_name(value)}.")
        if not min_items <= len(value) <= max_items:
            raise field_error(param, f"expected {min_items} to {max_items} items.")
        return [item(entry, f"{param}[{index}]") for index, entry in enumerate(value)]

    return check


def string_or_strings(max_items: int, max_chars: int) -> Check:
    """`stop`-style values: one non-empty string or up to `max_items` of them."""
    single = text(max_chars, allow_empty=False)
    several = array(single, max_items=max_items, min_items=1)

    def check(value: Any, param: str) -> str | list[str]:
        return single(value, param) if isinstance(value, str) else several(value, param)

    return check


def obj(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise field_error(param, f"expected an object, got {type_name(value)}.")
    return value


def known_keys(value: dict[str, Any], allowed: Collection[str], param: str) -> None:
    for key in value:
        if key not in allowed:
            raise unknown_parameter(f"{param}.{key}")


def unknown_parameter(param: str) -> GatewayError:
    # OpenAI's wording for a parameter it does not know, so existing clients recognise it.
    return invalid(
        f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
    )


def token_id(vocab_size: int | None) -> Check:
    maximum = (vocab_size - 1) if vocab_size else INT32_MAX
    return integer(0, maximum)


def json_value(value: Any, param: str) -> Any:
    """Any JSON value, nested at most MAX_JSON_DEPTH levels (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise field_error(param, f"nested deeper than {MAX_JSON_DEPTH} levels.")
        stack.extend((child, depth + 1) for child in children)
    return value


def json_object(value: Any, param: str) -> dict[str, Any]:
    checked = obj(value, param)
    json_value(checked, param)
    return checked


def json_text_object(value: Any, param: str) -> str:
    """A string holding a JSON object (tool call arguments, SGLang's `json_schema`)."""
    if not isinstance(value, str):
        raise field_error(
            param, f"expected a string holding a JSON object, got {type_name(value)}."
        )
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise field_error(param, "expected a string holding a JSON object.") from None
    json_object(parsed, param)
    return value
