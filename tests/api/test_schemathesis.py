"""Schemathesis against the running REST API and the OpenAPI schema it serves itself.

The real server process (uvicorn, as the README serves it) runs on the test database with
committed data: a client with keys, ledger rows and a served model, and a staff user with a
`write` operator token. Schemathesis 4 generates requests for every operation from
/api/v1/schema, positive and negative, within a fixed, deterministic budget, and fails on any
5xx, any status code, content type, header or body the schema does not document.

Order matters, and the runs go from harmless to destructive: the client operations first, then
the client revoking its keys (it may revoke the very key it authenticates with, after which
every request is a 401), then the operator operations (they rename, delete and change whatever
they find, the client's user and plan included), and last the operator changing users (it may
deactivate or demote its own user). Afterwards every table is put back as it was, so that the
tests that come later see the database this module found.

A failure shows Schemathesis' own report: each failure with a curl command that reproduces it
against a server started the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from django.db import connection, transaction
from django.utils import timezone

from tests.gateway.conftest import database_url_for_subprocess, gateway_args
from tests.procs import free_port, running

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SCHEMA_PATH = "/api/v1/schema"
# Every check that compares a response with the schema, plus "never a 5xx". Not the ones that
# judge what the API accepts (negative_data_rejection, positive_data_acceptance): the schema
# cannot express every rule (a username's characters, an existing user id) and DRF ignores
# unknown query parameters by design.
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)
# The fixed budget: at most this many cases per operation in the fuzzing phase; the coverage
# phase adds its own fixed set (boundaries, each required part missing, wrong types). The
# stateful phase is left out: drf-spectacular writes no OpenAPI links, and the destructive
# operations are ordered by hand (RUNS).
MAX_EXAMPLES = 25
PHASES = "examples,coverage,fuzzing"
SNAPSHOT_SCHEMA = "schemathesis_snapshot"
# A generous bound per run: the whole module takes about a minute on two cores.
RUN_TIMEOUT_SECONDS = 150


@dataclass(frozen=True)
class Run:
    """One Schemathesis invocation: the client operations with the client's key, or the
    operator operations (the paths under /api/v1/operator/) with the operator token."""

    name: str
    audience: str  # "client" or "operator": the tag, and the credential used
    only: str | None = None  # just this operation ("METHOD /path"), or …
    excluding: str | None = None  # … every operation of the audience but this one

    def selects(self, method: str, path: str, tags: list[str]) -> bool:
        name = f"{method.upper()} {path}"
        if self.audience not in tags:
            return False
        if path.startswith("/api/v1/operator/") != (self.audience == "operator"):
            return False
        if self.only is not None:
            return name == self.only
        return name != self.excluding

    def filters(self) -> list[str]:
        """Schemathesis' CLI filters for `selects`. Its includes are alternatives (an operation
        any of them matches is in) and its excludes too (one that matches puts it out): so a
        single include, and every other condition as an exclude."""
        if self.only is not None:
            return ["--include-name", self.only]
        outside = (
            r"^/api/v1/(?!operator/)" if self.audience == "operator" else r"^/api/v1/operator/"
        )
        args = ["--include-tag", self.audience, "--exclude-path-regex", outside]
        if self.excluding is not None:
            args += ["--exclude-name", self.excluding]
        return args


CLIENT_REVOKE = "POST /api/v1/keys/{id}/revoke"
OPERATOR_USER_CHANGE = "PATCH /api/v1/operator/users/{id}"
RUNS = [
    Run("client", "client", excluding=CLIENT_REVOKE),
    Run("client-revoke", "client", only=CLIENT_REVOKE),
    Run("operator", "operator", excluding=OPERATOR_USER_CHANGE),
    Run("operator-user-change", "operator", only=OPERATOR_USER_CHANGE),
]
# The runs whose credential must keep working throughout: the other two may lock themselves
# out on purpose.
RUNS_THAT_KEEP_THEIR_CREDENTIAL = {"client", "operator"}


@dataclass
class Data:
    """What make_data committed: the raw credentials by audience, and the ids of the objects
    the operations with an `{id}` in their path should find."""

    credentials: dict[str, str]
    ids: dict[str, list[int]]  # by resource: "keys", "users", "plans", "models"


@dataclass
class LiveApi:
    url: str
    data: Data
    schema: dict[str, Any]


# --- Committed data, and putting the database back afterwards -------------------------------------


def snapshot_tables() -> list[str]:
    """Copy every table of the test database into a schema of its own: the operator runs
    change and delete rows they did not create (the default plan, other users), which a
    delete-what-we-made clean-up cannot undo."""
    tables = sorted(connection.introspection.django_table_names(only_existing=True))
    with connection.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA IF EXISTS {SNAPSHOT_SCHEMA} CASCADE")
        cursor.execute(f"CREATE SCHEMA {SNAPSHOT_SCHEMA}")
        for table in tables:
            name = connection.ops.quote_name(table)
            cursor.execute(f"CREATE TABLE {SNAPSHOT_SCHEMA}.{name} AS TABLE public.{name}")
    return tables


def restore_tables(tables: list[str]) -> None:
    """Every table back to its snapshot, in one transaction (Django's foreign keys are
    deferred, so the order of the copies does not matter). Sequences keep counting: ids used
    by this module are not handed out again."""
    names = [connection.ops.quote_name(table) for table in tables]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(f'public.{name}' for name in names)} CASCADE")
        for name in names:
            cursor.execute(f"INSERT INTO public.{name} SELECT * FROM {SNAPSHOT_SCHEMA}.{name}")
        cursor.execute(f"DROP SCHEMA {SNAPSHOT_SCHEMA} CASCADE")


MODEL = "Qwen/Qwen2.5-7B-Instruct"


def make_data() -> Data:
    """A client on a plan that lets them manage their own keys, with two keys (one with limits
    of its own), ledger rows partly rolled up and partly not, two served models and an
    upstream sample; a staff user with a write-scoped operator token."""
    from accounts.services import (
        create_api_key,
        create_operator_token,
        get_or_create_user,
        update_api_key,
    )
    from gateway.services import save_served_model
    from quotas.models import UsageRecord
    from quotas.services import create_plan, default_plan, set_user_quota
    from telemetry.models import SGLangSample
    from telemetry.rollups import roll_up_recent

    plan = create_plan(
        actor=None, name="schemathesis-clients", self_service_keys=True, max_keys_per_user=4
    )
    # Users as get_or_create_user makes them, without an email address (the usual case).
    client, _ = get_or_create_user("schemathesis-client")
    set_user_quota(client, plan, actor=None)
    key, raw_key = create_api_key(client, actor=None, name="schemathesis")
    update_api_key(key, actor=None, name=key.name, expires_at=None, tokens_per_minute=5000)
    second, _ = create_api_key(client, actor=None, name="second")

    operator, _ = get_or_create_user("schemathesis-operator")
    operator.is_staff = True
    operator.save(update_fields=["is_staff"])
    set_user_quota(operator, default_plan(), actor=None)
    _, raw_token = create_operator_token(
        operator, actor=operator, name="schemathesis", scope="write"
    )

    model, _ = save_served_model(
        actor=None,
        model=None,
        name=MODEL,
        aliases=["korean-qwen"],
        upstream_url="http://127.0.0.1:9",
        lora_adapters=["legal-ko"],
        description="Schemathesis' model",
    )
    # A second one: the operator run deletes what it finds.
    spare, _ = save_served_model(
        actor=None, model=None, name="schemathesis-spare", upstream_url="http://127.0.0.1:9"
    )
    now = timezone.now()
    SGLangSample.objects.create(
        upstream_url="http://127.0.0.1:9", scraped_at=now, model_name=MODEL, running_requests=1.0
    )

    def ledger_row(api_key: Any, minutes_ago: int, status: int, error_type: str = "") -> None:
        started = now - timedelta(minutes=minutes_ago)
        UsageRecord.objects.create(
            request_id=uuid.uuid4().hex,
            user=client,
            api_key=api_key,
            model=MODEL if status != 429 else "",
            endpoint="chat",
            prompt_tokens=12,
            completion_tokens=7 if status == 200 else 0,
            status_code=status,
            error_type=error_type,
            started_at=started,
            finished_at=started + timedelta(milliseconds=900),
            time_to_first_token_ms=120.0 if status == 200 else None,
        )

    ledger_row(key, 90, 200)
    ledger_row(key, 30, 429, "tokens")
    ledger_row(second, 20, 502, "upstream_error")
    roll_up_recent(now)
    ledger_row(key, 5, 200)  # above the watermark: read from the ledger's tail
    return Data(
        credentials={"client": raw_key, "operator": raw_token},
        ids={
            "keys": [key.pk, second.pk],
            "users": [client.pk, operator.pk],
            "plans": [plan.pk, default_plan().pk],
            "models": [model.pk, spare.pk],
        },
    )


@pytest.fixture(scope="module")
def live_api(django_db_setup: None, django_db_blocker: Any) -> Iterator[LiveApi]:
    with django_db_blocker.unblock():
        tables = snapshot_tables()
    try:
        with django_db_blocker.unblock():
            data = make_data()
            database_url = database_url_for_subprocess()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "DATABASE_URL": database_url,
            # The budget is thousands of requests a minute: the API's own throttle would turn
            # most of them into documented, and useless, 429s.
            "API_THROTTLE_CLIENT": "100000/min",
            "API_THROTTLE_OPERATOR": "100000/min",
        }
        with running(gateway_args(port), f"{url}/health", env=env):
            schema = yaml.safe_load(httpx.get(f"{url}{SCHEMA_PATH}", timeout=30).text)
            yield LiveApi(url=url, data=data, schema=schema)
    finally:
        with django_db_blocker.unblock():
            restore_tables(tables)


# --- The runs -------------------------------------------------------------------------------------


def schemathesis_binary() -> str:
    beside = Path(sys.executable).with_name("schemathesis")
    return str(beside) if beside.exists() else "schemathesis"


def run_schemathesis(api: LiveApi, run: Run, workdir: Path) -> tuple[dict[str, Any], str, float]:
    """Run the CLI; returns its JSON report, its console output and how long it took."""
    # A configuration of our own, also so that a schemathesis.toml found in a parent directory
    # cannot change what CI runs.
    config = workdir / "schemathesis.toml"
    config.write_text(configuration(api.data))
    report_path = workdir / f"{run.name}.json"
    args = [
        schemathesis_binary(),
        "--config-file", str(config),
        "--no-color",
        "run", f"{api.url}{SCHEMA_PATH}",
        "--header", f"Authorization: Bearer {api.data.credentials[run.audience]}",
        *run.filters(),
        "--checks", CHECKS,
        "--phases", PHASES,
        "--max-examples", str(MAX_EXAMPLES),
        # The same cases on every run (no seed, no example database): a failure in CI is the
        # failure on a developer's machine.
        "--generation-deterministic",
        "--continue-on-failure",
        "--workers", "1",
        "--request-timeout", "20",
        # The credentials are this module's, gone with its data: the curl commands in a
        # failure must reproduce it, which a "[Filtered]" header or `key=` parameter does not.
        "--output-sanitize", "false",
        "--report", "json", "--report-json-path", str(report_path),
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        args,
        cwd=workdir,
        env={**os.environ, "COLUMNS": "120", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    if not report_path.exists():
        pytest.fail(f"Schemathesis wrote no report (exit {result.returncode}):\n{output}")
    return json.loads(report_path.read_text()), output, elapsed


# The operations that take each resource's id in their path.
ID_PATHS = {
    "keys": r"^/api/v1/(operator/)?keys/\{id\}",
    "users": r"^/api/v1/operator/users/\{id\}",
    "plans": r"^/api/v1/operator/plans/\{id\}",
    "models": r"^/api/v1/operator/models/\{id\}",
}
# How often an `{id}` is one of the existing objects rather than generated.
EXISTING_ID_SHARE = 0.75


def configuration(data: Data) -> str:
    """Schemathesis' settings (TOML) that no CLI option has: the ids that exist.

    Left to itself, Schemathesis fills `{id}` with values it learned from other answers, and it
    cannot tell a user id from a key id (every one is called `id`): it asked for keys by user
    ids, and never reached a key. So most path ids come from the objects make_data committed,
    per resource; the rest are generated (the 404s)."""
    lines = []
    for resource, ids in data.ids.items():
        lines += [f"[dictionaries.{resource}]", f"values = {ids}", ""]
    for resource, pattern in ID_PATHS.items():
        binding = f'{{ dictionary = "{resource}", probability = {EXISTING_ID_SHARE} }}'
        lines += [
            "[[operations]]",
            f"include-path-regex = '{pattern}'",
            f'parameters = {{ "path.id" = {binding} }}',
            "",
        ]
    return "\n".join(lines)


def selected_operations(schema: dict[str, Any], run: Run) -> list[str]:
    return [
        f"{method.upper()} {path}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if run.selects(method, path, operation.get("tags", []))
    ]


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 60)
@pytest.mark.parametrize("run", RUNS, ids=[run.name for run in RUNS])
def test_operations_answer_as_their_schema_says(
    live_api: LiveApi, run: Run, tmp_path: Path
) -> None:
    expected = selected_operations(live_api.schema, run)
    assert expected, f"the schema has no operation for the {run.name!r} run"
    report, output, elapsed = run_schemathesis(live_api, run, tmp_path)
    header = f"Schemathesis run {run.name!r} ({elapsed:.1f}s)"

    operations = report["operations"]
    assert operations["tested"] == len(expected) and not operations["errored"], (
        f"{header}: tested {operations}, expected {len(expected)}: {expected}\n{output}"
    )
    assert report["exit_code"] == 0 and not report["failures"] and not report["errors"], (
        f"{header} found problems. Each has a curl command that reproduces it against a server "
        f"started like this module's (uvicorn limiter_site.asgi:application):\n{output}"
    )
    if run.name in RUNS_THAT_KEEP_THEIR_CREDENTIAL:
        # A run whose every request was refused proves nothing about the schema.
        missing_auth = report["warnings"].get("missing_auth")
        assert not missing_auth, f"{header}: the credential was refused: {missing_auth}\n{output}"
        # Every read must have been answered with data at least once. (Not every write: whether
        # a generated body names an existing user, say, depends on the ids earlier tests used.)
        reads = [name for name in expected if name.startswith("GET ")]
        unreached = never_accepted(report, reads)
        assert not unreached, (
            f"{header}: no generated request was accepted by {unreached}: the data this module "
            f"creates (or the schema's constraints) no longer let the run get past validation, "
            f"so their answers went unchecked\n{output}"
        )


def never_accepted(report: dict[str, Any], operations: list[str]) -> list[str]:
    """The operations for which no positive case got a successful answer."""
    rates = report.get("valid_rates") or {}
    return [
        name
        for name in operations
        if not any(phase.get("accepted") for phase in (rates.get(name) or {}).values())
    ]


def test_the_server_survived_every_run(live_api: LiveApi) -> None:
    """No request took the process down or hung it (the runs above would show that only as
    connection errors of whichever run was going at the time)."""
    assert httpx.get(f"{live_api.url}/health", timeout=5).status_code == 200
