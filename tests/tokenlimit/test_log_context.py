"""Log lines carry their request's id and never a secret, in both formats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory

from limiter_site.middleware import RequestIdMiddleware
from tokenlimit import log_context

KEY = "sk-Zq3x9LmN0pQrStUvWxYz0123456789abcdefGHIJ"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, io.StringIO]]:
    """A logger with one handler per format, as LOGGING sets them up."""
    logger = logging.getLogger(f"test.log_context.{id(object())}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    plain, as_json = io.StringIO(), io.StringIO()
    for stream, formatter in (
        (plain, log_context.PlainFormatter("%(levelname)s [%(request_id)s] %(message)s")),
        (as_json, log_context.JsonFormatter("%(asctime)s %(request_id)s %(message)s")),
    ):  # fmt: skip
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(log_context.RequestIdFilter())
        logger.addHandler(handler)
    yield logger, plain, as_json


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        (f"key {KEY} refused", "sk-****GHIJ", KEY[5:-4]),
        ("operator op-AbCdEfGh12345678XyZ9 used", "op-****XyZ9", "AbCdEfGh1234"),
        ("Authorization: Bearer abcdefgh.ijklmnop-qrst", "Bearer [redacted]", "ijklmnop"),
        ("connect postgres://limiter:s3cr3t-pw@db:5432/limiter failed", "limiter:[redacted]@db",
         "s3cr3t-pw"),
        ("EMAIL_HOST_PASSWORD=hunter2hunter2 secret_key: 'abc123xyz'", "[redacted]", "hunter2"),
        ("token_counter=tokenizer:/opt/qwen is fine", "token_counter=tokenizer:/opt/qwen", "!"),
    ],
)  # fmt: skip
def test_secrets_are_redacted_in_both_formats(
    captured: tuple[logging.Logger, io.StringIO, io.StringIO], text: str, kept: str, gone: str
) -> None:
    logger, plain, as_json = captured
    logger.info("%s", text)
    line = json.loads(as_json.getvalue())
    for output in (plain.getvalue(), line["message"]):
        assert kept in output
        assert gone not in output


def test_a_secret_in_a_traceback_is_redacted(
    captured: tuple[logging.Logger, io.StringIO, io.StringIO],
) -> None:
    logger, plain, as_json = captured
    try:
        raise ConnectionError(f"upstream refused {KEY}")
    except ConnectionError:
        logger.exception("call failed")
    assert KEY not in plain.getvalue() and "Traceback" in plain.getvalue()
    line = json.loads(as_json.getvalue())
    assert KEY not in line["exc_info"] and "ConnectionError" in line["exc_info"]


def test_the_request_id_is_the_context_s(
    captured: tuple[logging.Logger, io.StringIO, io.StringIO],
) -> None:
    logger, plain, as_json = captured
    logger.info("outside")
    token = log_context.request_id.set("abc123")
    try:
        logger.info("inside")
    finally:
        log_context.request_id.reset(token)
    assert plain.getvalue().splitlines() == ["INFO [-] outside", "INFO [abc123] inside"]
    lines = [json.loads(line) for line in as_json.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["-", "abc123"]
    # ISO 8601 with the zone's offset.
    assert lines[0]["time"][10] == "T" and lines[0]["time"][-6] in "+-"


def test_pages_get_a_request_id_in_their_log_lines_and_answer() -> None:
    seen: list[str] = []

    def view(request: HttpRequest) -> HttpResponse:
        seen.append(log_context.request_id.get())
        return HttpResponse("ok")

    response = RequestIdMiddleware(view)(RequestFactory().get("/", HTTP_X_REQUEST_ID="evil\nid"))
    assert isinstance(response, HttpResponse)
    assert len(seen[0]) == 32 and response["X-Request-ID"] == seen[0]  # ours, not the client's
    assert log_context.request_id.get() == "-"  # reset after the request
