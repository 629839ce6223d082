"""The OpenAPI schema: the checked-in copy (docs/openapi.yaml) is what the code generates, the
generation is clean, every operation documents its errors, and the documentation pages work
behind a firewall (no CDN: every script, style and image from our own static files)."""

from __future__ import annotations

import difflib
import re
from functools import cache
from typing import Any

import pytest
import yaml
from django.test import Client
from django.utils import translation
from drf_spectacular.drainage import GENERATOR_STATS
from drf_spectacular.renderers import OpenApiYamlRenderer
from drf_spectacular.settings import spectacular_settings
from drf_spectacular.validation import validate_schema

from tests.procs import ROOT

SCHEMA_FILE = ROOT / "docs" / "openapi.yaml"
# English: the checked-in schema must not change each time a translation does (with no --lang
# it would be written in LANGUAGE_CODE, Korean, as far as translated).
SCHEMA_LANGUAGE = "en"
# The same on SQLite and PostgreSQL: integer bounds are declared on the serializers, not taken
# from the database backend.
REGENERATE = (
    "DEBUG=1 .venv/bin/python manage.py spectacular "
    f"--lang {SCHEMA_LANGUAGE} --validate --fail-on-warn --file docs/openapi.yaml"
)
ERROR_REF = "#/components/schemas/Error"
# What every operation may answer (api/schema.py: COMMON_ERRORS).
ALWAYS = {"401", "403", "429", "500"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@cache
def generated() -> tuple[bytes, dict[str, Any], tuple[str, ...]]:
    """What `manage.py spectacular --lang en --file …` writes, byte for byte, with the schema
    as a dict and every warning or error drf-spectacular emitted while generating it."""
    GENERATOR_STATS.reset()
    generator = spectacular_settings.DEFAULT_GENERATOR_CLASS()
    with translation.override(SCHEMA_LANGUAGE):
        schema = generator.get_schema(request=None, public=True)
    problems = (*GENERATOR_STATS._warn_cache, *GENERATOR_STATS._error_cache)
    GENERATOR_STATS.reset()
    return OpenApiYamlRenderer().render(schema, renderer_context={}), schema, problems


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], list[Any]]]:
    """(method, path, operation, the path's and the operation's parameters) for each one."""
    found = []
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                parameters = [*item.get("parameters", []), *operation.get("parameters", [])]
                found.append((method.upper(), path, operation, parameters))
    return found


# --- The checked-in schema ----------------------------------------------------------------------


def test_the_checked_in_schema_is_the_generated_one() -> None:
    output, _, _ = generated()
    assert SCHEMA_FILE.exists(), f"{SCHEMA_FILE} is missing; write it with:\n    {REGENERATE}"
    checked_in = SCHEMA_FILE.read_bytes()
    if checked_in == output:
        return
    diff = list(
        difflib.unified_diff(
            checked_in.decode().splitlines(),
            output.decode().splitlines(),
            "docs/openapi.yaml (checked in)",
            "generated from the code",
            lineterm="",
            n=2,
        )
    )
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    shown = "\n".join(diff[:80]) + ("\n…" if len(diff) > 80 else "")
    pytest.fail(
        f"docs/openapi.yaml is out of date with the API (+{added} -{removed} lines). If the "
        f"change is intended, regenerate it and commit it with the code:\n    {REGENERATE}\n\n"
        f"{shown}"
    )


def test_generating_the_schema_gives_no_warning_or_error() -> None:
    _, schema, problems = generated()
    assert not problems, (
        "drf-spectacular could not describe part of the API (fix it in the view or serializer: "
        "@extend_schema, @extend_schema_field, a typed SerializerMethodField):\n"
        + "\n".join(problems)
    )
    validate_schema(schema)  # raises on anything that is not valid OpenAPI 3


# --- What every operation documents --------------------------------------------------------------


def test_every_operation_is_either_a_client_or_an_operator_operation() -> None:
    """The CI's Schemathesis runs select operations by these tags (tests/api/test_schemathesis.py):
    an operation with neither would never be tested."""
    _, schema, _ = generated()
    wrong = []
    for method, path, operation, _ in operations(schema):
        expected = "operator" if path.startswith("/api/v1/operator/") else "client"
        if operation.get("tags") != [expected]:
            wrong.append(f"{method} {path}: tags {operation.get('tags')}, expected [{expected!r}]")
    assert not wrong, "\n".join(wrong)


def test_every_operation_documents_its_errors_with_the_error_schema() -> None:
    _, schema, _ = generated()
    assert "Error" in schema["components"]["schemas"]
    missing, wrong_body = [], []
    for method, path, operation, parameters in operations(schema):
        responses = operation["responses"]
        expected = set(ALWAYS)
        if "requestBody" in operation or any(p["in"] == "query" for p in parameters):
            expected.add("400")
        if any(p["in"] == "path" for p in parameters):
            expected.add("404")
        if absent := sorted(expected - set(responses)):
            missing.append(f"{method} {path}: no {', '.join(absent)}")
        for status, response in sorted(responses.items()):
            if status[0] in "45" and error_ref(response) != ERROR_REF:
                wrong_body.append(f"{method} {path} {status}: {response}")
    report = []
    if missing:
        report += ["Undocumented error statuses:", *missing]
    if wrong_body:
        report += ["Error responses without the Error schema:", *wrong_body]
    assert not report, "\n".join(report)


def error_ref(response: dict[str, Any]) -> str | None:
    content = response.get("content", {})
    if set(content) != {"application/json"}:
        return None
    ref: str | None = content["application/json"].get("schema", {}).get("$ref")
    return ref


def test_the_schema_the_server_serves_is_the_generated_one(client: Client) -> None:
    """/api/v1/schema (the one Schemathesis reads in CI) is the same document."""
    response = client.get("/api/v1/schema", HTTP_ACCEPT_LANGUAGE=SCHEMA_LANGUAGE)
    assert response.status_code == 200
    assert yaml.safe_load(response.content) == generated()[1]


# --- Swagger UI and Redoc, without a CDN ---------------------------------------------------------

ABSOLUTE_URL = re.compile(r"""https?://[^\s"'<>)]+""")
LINKED = re.compile(r"""\b(?:src|href|spec-url)\s*=\s*["']([^"']+)["']""")


# No query is made, but closing a response sends request_finished, which checks the connection
# an earlier test may have left open: that check needs database access.
@pytest.mark.django_db
@pytest.mark.parametrize("page", ["/api/v1/docs", "/api/v1/redoc"])
def test_documentation_pages_load_everything_from_our_own_static_files(
    client: Client, page: str
) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    external = sorted(set(ABSOLUTE_URL.findall(html)))
    assert not external, (
        f"{page} loads from outside the server (breaks behind a firewall, and tells a third "
        f"party who reads our docs): {external}"
    )
    linked = LINKED.findall(html)
    static = [url for url in linked if url.startswith("/static/")]
    assert static, f"{page} links no static file at all: {linked}"
    for url in linked:
        assert url.startswith("/") and not url.startswith("//"), (
            f"{page}: {url} is not a path on this server"
        )
        answer = client.get(url)
        answer.close()  # WhiteNoise streams the file: nothing to read here
        assert answer.status_code == 200, f"{page}: {url} answers {answer.status_code}"
        if url in static:
            assert not answer["Content-Type"].startswith("text/html"), (url, answer["Content-Type"])
