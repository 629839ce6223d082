"""REST API: /api/v1/me, /usage and /requests over HTTP against a 1,000,000-row ledger.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_api \\
    REDIS_URL=redis://127.0.0.1:6379/9 LIMITER_REDIS_PREFIX=bench_api \\
        .venv/bin/python bench/api_bench.py [--rows 1000000] [--users 300] [--requests 300] \\
        [--rounds 3] [--explain] [--write docs/benchmarks.md]

The database named by DATABASE_URL is migrated and its ledger and roll-ups are replaced (use a
scratch database: the script refuses a name that does not start with "bench"). Seeding is
skipped when the database already holds a seed with the same parameters, less than a day old
(`--reseed` forces it): users with an API key each on one plan; the ledger over the last 35
days by COPY (Zipf-skewed users, office hours in Seoul, several models, 429s with model "" and
some errors); the roll-ups rebuilt (telemetry.rollups.rebuild) for all of it except the newest
`--tail` rows, which stay above the watermark, as rows written since the last roll_up_recent
do, so every report reads both parts.

Then the real server runs (uvicorn, `limiter_site.asgi:application`, DEBUG off, Redis for the
limiter and the API's throttle, the throttle raised out of the way) and one httpx client sends
sequential requests, after a warm-up, for the heaviest user and the median user. Next to them,
in this process: the same usage report (`usage_report` alone, then with the API's serializer
and JSON rendering, then the whole view through Django's test client, which has no ASGI and no
socket), so what each layer adds is visible; and GET /health, which never reaches Django, as
the floor of uvicorn plus the client. Every row runs in `--rounds` interleaved passes. With
--explain, EXPLAIN (ANALYZE, BUFFERS) of the reports' and the /requests page's statements.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")
os.environ.setdefault("DEBUG", "1")
# The in-process measurements go through the API's throttle as well (120/min by default).
os.environ.setdefault("API_THROTTLE_CLIENT", "1000000/min")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.db.models import Count  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from accounts.models import ApiKey  # noqa: E402
from accounts.services import create_api_key, get_or_create_user, revoke_api_keys  # noqa: E402
from bench.gateway_bench import cpu_seconds, write_section  # noqa: E402
from quotas.models import Plan, UsageRecord  # noqa: E402
from quotas.services import create_plan, set_user_quota, update_plan  # noqa: E402
from telemetry import rollups  # noqa: E402
from telemetry.models import RollupCursor, UsageRollup  # noqa: E402
from telemetry.usage import usage_report  # noqa: E402
from tests.procs import free_port, running  # noqa: E402

ACTOR = "api_bench"
PLAN_NAME = "api-bench"
USER_PREFIX = "api-bench-"
SEED_VERSION = 1  # bump when the generated data changes, so an old seed is replaced
HISTORY_DAYS = 35
REPORT_DAYS = 30
TAIL_MINUTES = 10  # the not rolled-up rows started within this many minutes before the seed
MAX_SEED_AGE = timedelta(days=1)  # an older seed is replaced: "30 days back" must stay inside
WARMUP = 20
ME = "GET /me"
USAGE_HOUR = "GET /usage hour, 30 days"
REPORT = "usage_report(hour, 30 days), in-process"
RENDERED = "… + serializer + JSON, in-process"
TEST_CLIENT = "Django test client (no ASGI, no HTTP)"
HEALTH = "GET /health (no Django: uvicorn and the client)"

# (name, share of requests); the LoRA adapter is a model name of its own in the ledger.
MODELS = (
    ("Qwen/Qwen2.5-7B-Instruct", 0.55),
    ("Qwen/Qwen2.5-32B-Instruct", 0.25),
    ("Qwen/Qwen3-8B", 0.15),
    ("Qwen/Qwen2.5-7B-Instruct:ko-legal", 0.05),
)
LIMIT_KINDS = ("tokens", "requests", "tokens_per_hour", "parallel_requests")
# Relative traffic per Seoul hour of the day (office hours), weekends at WEEKEND.
HOURLY = (
    0.15, 0.1, 0.1, 0.1, 0.1, 0.15, 0.2, 0.4, 0.7, 1.0, 1.0, 1.0,
    0.7, 1.0, 1.0, 1.0, 1.0, 0.9, 0.6, 0.5, 0.5, 0.4, 0.3, 0.2,
)  # fmt: skip
WEEKEND = 0.4
COLUMNS = (
    "request_id", "user_id", "api_key_id", "model", "endpoint", "prompt_tokens",
    "completion_tokens", "cached_tokens", "estimated_prompt_tokens", "usage_source",
    "status_code", "error_type", "streamed", "client_disconnected", "started_at", "finished_at",
    "upstream_latency_ms", "time_to_first_token_ms",
)  # fmt: skip


# --- Seeding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    rows: int
    users: int
    tail: int
    seed: int

    @property
    def fingerprint(self) -> str:
        return (
            f"api_bench seed v{SEED_VERSION}: rows={self.rows} users={self.users} "
            f"tail={self.tail} seed={self.seed}"
        )


def check_scratch_database() -> None:
    name = str(connection.settings_dict["NAME"])
    if connection.vendor != "postgresql" or not Path(name).name.startswith("bench"):
        sys.exit(f"refusing to replace the ledger of {connection.vendor} database {name!r}: "
                 "point DATABASE_URL at a PostgreSQL scratch database named bench…")  # fmt: skip


def is_seeded(seed: Seed) -> bool:
    plan = Plan.objects.filter(name=PLAN_NAME).first()
    if plan is None or plan.description != seed.fingerprint:
        return False
    newest = UsageRecord.objects.order_by("-pk").values_list("started_at", flat=True).first()
    fresh = newest is not None and newest > datetime.now(UTC) - MAX_SEED_AGE
    return fresh and UsageRecord.objects.count() == seed.rows


def bench_plan() -> Plan:
    plan = Plan.objects.filter(name=PLAN_NAME).first()
    if plan is None:
        plan = create_plan(actor=None, actor_label=ACTOR, name=PLAN_NAME, description="")
    return plan


def bench_users(count: int, plan: Plan) -> list[tuple[int, int]]:
    """(user id, API key id) of api-bench-000…, each on the bench plan with one key."""
    pairs = []
    for index in range(count):
        user, _ = get_or_create_user(f"{USER_PREFIX}{index:03d}")
        set_user_quota(user, plan, actor=None, actor_label=ACTOR)
        key = ApiKey.objects.filter(user=user, name="seed").order_by("pk").first()
        if key is None:
            key, _ = create_api_key(user, actor=None, actor_label=ACTOR, name="seed")
        pairs.append((user.pk, key.pk))
    return pairs


def hour_slots(start: datetime, end: datetime) -> tuple[list[float], list[float]]:
    """(epoch of each UTC hour from start's to end's, cumulative traffic weights)."""
    zone = rollups.local_zone()
    first = start.replace(minute=0, second=0, microsecond=0)
    slots, cumulative, total = [], [], 0.0
    moment = first
    while moment < end:
        local = moment.astimezone(zone)
        total += HOURLY[local.hour] * (WEEKEND if local.weekday() >= 5 else 1.0)
        slots.append(moment.timestamp())
        cumulative.append(total)
        moment += timedelta(hours=1)
    return slots, cumulative


def ledger_rows(
    seed: Seed, users: list[tuple[int, int]], now: datetime
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(rows to roll up, tail rows), each ordered by started_at as a live ledger's ids are."""
    rng = random.Random(seed.seed)
    history_start = now - timedelta(days=HISTORY_DAYS)
    tail_start = now - timedelta(minutes=TAIL_MINUTES)
    # Zipf over users (rank 1 is api-bench-000): a few heavy users, a long tail of light ones.
    weights = [1 / (rank**1.1) for rank in range(1, len(users) + 1)]
    model_names = [name for name, _ in MODELS]
    model_weights = [share for _, share in MODELS]
    favourite = rng.choices(model_names, model_weights, k=len(users))
    # Heavy users run into their limits more often.
    limited_share = [0.12 if rank < 5 else 0.03 for rank in range(len(users))]

    slots, cumulative = hour_slots(history_start, tail_start)
    lo, hi = history_start.timestamp(), tail_start.timestamp()
    moments: list[float] = []
    old_rows = seed.rows - seed.tail
    while len(moments) < old_rows:
        for slot in rng.choices(slots, cum_weights=cumulative, k=old_rows - len(moments)):
            moment = slot + rng.random() * 3600
            if lo <= moment < hi:
                moments.append(moment)
    moments.sort()
    tail = sorted(hi + rng.random() * (now.timestamp() - hi) for _ in range(seed.tail))
    who = rng.choices(range(len(users)), weights, k=seed.rows)

    rows: list[tuple[Any, ...]] = []
    for number, (moment, index) in enumerate(zip([*moments, *tail], who, strict=True)):
        user_id, key_id = users[index]
        started = datetime.fromtimestamp(moment, UTC)
        fate = rng.random()
        if fate < limited_share[index]:
            # Refused before any model was chosen: model "", nothing billed.
            latency = rng.uniform(0.3, 2.0)
            rows.append((
                f"bench-{number:010d}", user_id, key_id, "", "", 0, 0, 0,
                rng.randint(20, 3000), "none", 429, rng.choice(LIMIT_KINDS), False, False,
                started, started + timedelta(milliseconds=latency), None, None,
            ))  # fmt: skip
            continue
        model = (
            favourite[index] if rng.random() < 0.8 else rng.choices(model_names, model_weights)[0]
        )
        prompt = int(rng.lognormvariate(6.0, 1.0)) + 8  # median about 400
        completion = int(rng.lognormvariate(5.3, 0.9)) + 1  # median about 200
        cached = int(prompt * rng.uniform(0.2, 0.9)) if rng.random() < 0.5 else 0
        streamed = rng.random() < 0.6
        ttft = rng.uniform(40, 400)
        status, error, usage_source, disconnected = 200, "", "upstream", False
        fate = rng.random()
        if fate < 0.004:
            status, error, usage_source, completion = 502, "upstream_error", "none", 0
        elif fate < 0.008:
            status, error, usage_source, disconnected = 499, "", "gateway", True
            completion = completion // 3
        elif fate < 0.012:
            status, error, usage_source, prompt, completion, cached = (
                400, "invalid_request_error", "none", 0, 0, 0,
            )  # fmt: skip
        latency = ttft + completion * rng.uniform(15, 40)
        rows.append((
            f"bench-{number:010d}", user_id, key_id, model,
            "chat/completions" if rng.random() < 0.9 else "completions",
            prompt, completion, cached, prompt + rng.randint(-3, 3) if prompt > 3 else prompt,
            usage_source, status, error, streamed, disconnected, started,
            started + timedelta(milliseconds=latency), latency - rng.uniform(0.5, 3),
            ttft if streamed and completion else None,
        ))  # fmt: skip
    return rows[:old_rows], rows[old_rows:]


def copy_rows(rows: list[tuple[Any, ...]]) -> None:
    statement = f"COPY {UsageRecord._meta.db_table} ({', '.join(COLUMNS)}) FROM STDIN"
    with transaction.atomic(), connection.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def local_days(start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime]]:
    """[local midnight, next local midnight) for every Seoul day that [start, end) touches."""
    day = rollups.period_floor("day", start)
    while day < end:
        following = rollups.period_after("day", day)
        yield day, following
        day = following


def seed_database(seed: Seed) -> dict[str, float]:
    """Replace the bench data; returns seconds per step."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    plan = bench_plan()
    update_plan(plan, actor=None, actor_label=ACTOR, description="api_bench: seeding")
    with connection.cursor() as cursor:
        tables = [UsageRecord._meta.db_table, UsageRollup._meta.db_table]
        cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
    RollupCursor.objects.filter(name=rollups.WATERMARK_NAME).delete()
    users = bench_users(seed.users, plan)
    timings["users and keys"] = time.perf_counter() - clock

    clock = time.perf_counter()
    now = datetime.now(UTC).replace(microsecond=0)
    old, tail = ledger_rows(seed, users, now)
    timings["generate rows"] = time.perf_counter() - clock

    clock = time.perf_counter()
    copy_rows(old)
    timings["COPY rows to roll up"] = time.perf_counter() - clock

    clock = time.perf_counter()
    # A day at a time: one roll_up holds every cell of its range in memory.
    for first, stop in local_days(now - timedelta(days=HISTORY_DAYS), now):
        rollups.rebuild(first, stop)
    top = UsageRecord.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    with transaction.atomic():
        rollups.get_watermark()  # locks the row, as roll_up_recent does
        rollups.set_watermark(rollups.Watermark().advanced(now, top))
    timings["roll-ups (rebuild by day)"] = time.perf_counter() - clock

    clock = time.perf_counter()
    copy_rows(tail)  # above the watermark: the reports' tail
    timings["COPY tail"] = time.perf_counter() - clock

    clock = time.perf_counter()
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"VACUUM ANALYZE {table}")
    timings["VACUUM ANALYZE"] = time.perf_counter() - clock
    update_plan(plan, actor=None, actor_label=ACTOR, description=seed.fingerprint)
    return timings


# --- What the data looks like -------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    label: str
    user_id: int
    rows: int  # ledger rows in the report's 30 days


def subjects(seed: Seed, start: datetime) -> list[Subject]:
    """The heaviest user and the median one, by ledger rows in the report's range."""
    counts = dict(
        UsageRecord.objects.filter(started_at__gte=start, user__username__startswith=USER_PREFIX)
        .values_list("user_id")
        .annotate(n=Count("pk"))
        .order_by()
    )
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    heavy, typical = ranked[0], ranked[len(ranked) // 2]
    return [Subject("heaviest", heavy[0], heavy[1]), Subject("median", typical[0], typical[1])]


def data_summary(seed: Seed, people: list[Subject]) -> list[str]:
    watermark = rollups.get_watermark().rolled_up_to
    total = UsageRecord.objects.count()
    tail = UsageRecord.objects.filter(pk__gt=watermark).count()
    cells = dict(UsageRollup.objects.values_list("period").annotate(n=Count("pk")).order_by())
    limited = UsageRecord.objects.filter(status_code=429).count()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_size_pretty(pg_total_relation_size(%s))",
                       [UsageRecord._meta.db_table])  # fmt: skip
        ledger_size = cursor.fetchone()[0]
        cursor.execute("SELECT pg_size_pretty(pg_total_relation_size(%s))",
                       [UsageRollup._meta.db_table])  # fmt: skip
        rollup_size = cursor.fetchone()[0]
    lines = [
        f"Ledger: {total:,} rows over {HISTORY_DAYS} days ({ledger_size} with indexes), "
        f'{seed.users} users on a Zipf curve, {limited:,} of them 429s (model ""); '
        f"{tail:,} rows above the roll-up watermark (the tail every report adds).",
        f"Roll-up cells: {cells.get('minute', 0):,} minute, {cells.get('hour', 0):,} hour, "
        f"{cells.get('day', 0):,} day ({rollup_size}).",
    ]
    for person in people:
        hours = UsageRollup.objects.filter(
            user_id=person.user_id, period="hour",
            period_start__gte=datetime.now(UTC) - timedelta(days=REPORT_DAYS),
        ).count()  # fmt: skip
        lines.append(
            f"The {person.label} user: {person.rows:,} ledger rows in the last {REPORT_DAYS} "
            f"days, {hours:,} hour cells."
        )
    return lines


# --- Measuring ----------------------------------------------------------------------------------


@dataclass
class Timing:
    """One row of the table: one request (or call) for one user, timed `requests` times."""

    name: str
    who: str
    call: Callable[[], int]  # one request; returns the response's size in bytes (0: none)
    server_pid: int | None = None  # whose CPU the row reports (the HTTP server's)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    size: int = 0
    warm: bool = False

    def run(self, n: int) -> None:
        if not self.warm:
            for _ in range(WARMUP):
                self.call()
            self.warm = True
        cpu_before = cpu_seconds(self.server_pid) if self.server_pid else 0.0
        started = time.perf_counter()
        for _ in range(n):
            clock = time.perf_counter()
            self.size = self.call()
            self.latencies_ms.append((time.perf_counter() - clock) * 1000)
        self.seconds += time.perf_counter() - started
        if self.server_pid:
            self.cpu_seconds += cpu_seconds(self.server_pid) - cpu_before

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds

    @property
    def cpu_ms(self) -> float | None:
        return self.cpu_seconds * 1000 / len(self.latencies_ms) if self.server_pid else None


def interleaved(timings: list[Timing], requests: int, rounds: int) -> None:
    """`requests` per row, in `rounds` passes over all rows, so that a burst of load from
    elsewhere on the machine spreads over every row instead of spoiling one."""
    for done in range(rounds):
        share = requests * (done + 1) // rounds - requests * done // rounds
        for timing in timings:
            timing.run(share)


def http_call(client: httpx.Client, path: str, params: dict[str, str]) -> Callable[[], int]:
    def call() -> int:
        response = client.get(path, params=params)
        if response.status_code != 200:
            raise RuntimeError(f"{path} {params}: {response.status_code} {response.text[:300]}")
        return len(response.content)

    return call


def test_client_call(client: Any, path: str, query: dict[str, str]) -> Callable[[], int]:
    """A GET through Django's test client: the synchronous handler, no ASGI, no socket."""

    def call() -> int:
        response = client.get(path, query)
        if response.status_code != 200:
            raise RuntimeError(f"{path}: {response.status_code}")
        return len(response.content)

    return call


def rendered_usage(user_id: int, start: datetime, end: datetime) -> bytes:
    """What UsageView does after parsing the query: the report, serialised and rendered."""
    from rest_framework.renderers import JSONRenderer

    from api import serializers
    from api.client_views import report_payload

    report = usage_report(user_id=user_id, period="hour", start=start, end=end)
    data = serializers.UsageSerializer(report_payload(report)).data
    return JSONRenderer().render(data)


def deep_cursor(user_id: int, url: str) -> str:
    """A /requests cursor halfway through the user's ledger, as DRF encodes a `next` link."""
    from rest_framework.pagination import Cursor

    from api.pagination import NewestRequestsFirst

    rows = UsageRecord.objects.filter(user_id=user_id).order_by("-started_at", "-id")
    middle = rows.count() // 2
    position = rows.values_list("started_at", flat=True)[middle]
    pager = NewestRequestsFirst()
    pager.base_url = url
    link = pager.encode_cursor(Cursor(offset=0, reverse=False, position=str(position)))
    return dict(httpx.URL(link).params)["cursor"]


def server_env(scratch: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": os.environ["DATABASE_URL"],
        "REDIS_URL": settings.REDIS_URL,
        "LIMITER_REDIS_PREFIX": settings.LIMITER_REDIS_PREFIX,
        "API_THROTTLE_CLIENT": "1000000/min",
        "EMBEDDED_BEAT": "0",  # nothing may roll the tail up while we measure
        "LEDGER_SPOOL_DIR": str(scratch / "spool"),
        # As in production: no debug query log, the development key refused.
        "DEBUG": "0",
        "SECRET_KEY": "api-bench-" + "x" * 50,
        "ALLOWED_HOSTS": "127.0.0.1",
    }


def bench_keys(people: list[Subject]) -> dict[int, tuple[ApiKey, str]]:
    """A fresh key per measured user (a raw key is shown once only); revoked at the end."""
    users = User.objects.in_bulk([person.user_id for person in people])
    return {
        uid: create_api_key(user, actor=None, actor_label=ACTOR, name="bench run")
        for uid, user in users.items()
    }


def cases(since: str, cursor: str) -> list[tuple[str, str, dict[str, str]]]:
    """(row name, path, query) of every request measured over HTTP, per user."""
    hour = {"period": "hour", "start": since}
    return [
        (ME, "/api/v1/me", {}),
        (USAGE_HOUR, "/api/v1/usage", hour),
        ("GET /usage day, 30 days", "/api/v1/usage", {"period": "day", "start": since}),
        ("GET /usage hour, 30 days, CSV", "/api/v1/usage", {**hour, "format": "csv"}),
        ("GET /requests?limit=50, first page", "/api/v1/requests", {"limit": "50"}),
        ("GET /requests?limit=50, halfway cursor", "/api/v1/requests",
         {"limit": "50", "cursor": cursor}),
    ]  # fmt: skip


def in_process(person: Subject, raw_key: str, start: datetime) -> list[Timing]:
    """The report alone, with serializer and JSON, and whole views through Django's test
    client (middleware, authentication, throttle, DRF; no ASGI, no HTTP)."""
    from rest_framework.test import APIClient

    end = datetime.now(UTC)

    def report() -> int:
        usage_report(user_id=person.user_id, period="hour", start=start, end=end)
        return 0

    def rendered() -> int:
        return len(rendered_usage(person.user_id, start, end))

    client = APIClient(HTTP_HOST="127.0.0.1")
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    hour = {"period": "hour", "start": start.isoformat()}
    return [
        Timing(REPORT, person.label, report),
        Timing(RENDERED, person.label, rendered),
        Timing(f"{USAGE_HOUR}, {TEST_CLIENT}", person.label,
               test_client_call(client, "/api/v1/usage", hour)),
        Timing(f"{ME}, {TEST_CLIENT}", person.label, test_client_call(client, "/api/v1/me", {})),
    ]  # fmt: skip


def measure(
    people: list[Subject], keys: dict[int, tuple[ApiKey, str]], start: datetime, args: Any
) -> tuple[list[Timing], list[Timing], int]:
    """(over HTTP, in this process, database sessions opened meanwhile): every row,
    interleaved, while the server runs."""
    settings.DEBUG = False  # no query log in this process either, as the server runs
    scratch = Path(tempfile.mkdtemp(prefix="api-bench-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_args = ["-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--lifespan",
                   "on", "--no-access-log", "limiter_site.asgi:application"]  # fmt: skip
    with ExitStack() as stack:
        server = stack.enter_context(running(server_args, f"{base}/health", server_env(scratch)))
        http: list[Timing] = []
        local: list[Timing] = []
        for person in people:
            raw_key = keys[person.user_id][1]
            client = stack.enter_context(
                httpx.Client(base_url=base, headers={"Authorization": f"Bearer {raw_key}"},
                             timeout=60)
            )  # fmt: skip
            cursor = deep_cursor(person.user_id, f"{base}/api/v1/requests")
            http += [
                Timing(name, person.label, http_call(client, path, params), server.pid)
                for name, path, params in cases(start.isoformat(), cursor)
            ]
            local += in_process(person, raw_key, start)
        floor = stack.enter_context(httpx.Client(base_url=base, timeout=60))
        http.append(Timing(HEALTH, "—", http_call(floor, "/health", {}), server.pid))
        sessions = database_sessions()
        interleaved(http + local, args.requests, args.rounds)
        opened = database_sessions() - sessions
    return http, local, opened


def database_sessions() -> int:
    """Sessions ever opened on this database (PostgreSQL 14+), as its statistics say now."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


def explain(people: list[Subject], start: datetime) -> None:
    """EXPLAIN ANALYZE of the statements behind the hour and day reports and the halfway
    /requests page."""
    for person in people:
        with CaptureQueriesContext(connection) as queries:
            for period in ("hour", "day"):
                usage_report(user_id=person.user_id, period=period, start=start,
                             end=datetime.now(UTC))  # fmt: skip
        rows = UsageRecord.objects.filter(user_id=person.user_id).order_by("-started_at", "-id")
        middle = rows.values_list("started_at", flat=True)[rows.count() // 2]
        page = rows.filter(started_at__lt=middle).select_related("api_key")[:51]
        statements: list[tuple[str, Any]] = [
            (query["sql"], ()) for query in queries.captured_queries
        ]
        statements.append(page.query.sql_with_params())
        for sql, params in statements:
            with connection.cursor() as cursor:
                cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params)
                plan = "\n".join(row[0] for row in cursor.fetchall())
            print(f"\n--- {person.label} user: {sql[:160]}…\n{plan}")


# --- Output -------------------------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def table(timings: list[Timing]) -> list[str]:
    lines = [
        "| request | user | p50 ms | p90 ms | p99 ms | req/s | server CPU ms/req | bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in timings:
        cpu = f"{t.cpu_ms:.2f}" if t.cpu_ms is not None else "—"
        size = f"{t.size:,}" if t.size else "—"
        lines.append(
            f"| {t.name} | {t.who} | {t.pct(0.5):.2f} | {t.pct(0.9):.2f} | {t.pct(0.99):.2f} | "
            f"{t.rps:,.0f} | {cpu} | {size} |"
        )
    return lines


def overhead(http: list[Timing], local: list[Timing]) -> list[str]:
    def p50(rows: list[Timing], who: str, name: str) -> float:
        return next(t for t in rows if t.who == who and t.name == name).pct(0.5)

    lines = []
    for who in dict.fromkeys(t.who for t in local):
        query, full = p50(local, who, REPORT), p50(local, who, RENDERED)
        view, wire = p50(local, who, f"{USAGE_HOUR}, {TEST_CLIENT}"), p50(http, who, USAGE_HOUR)
        me_view, me_wire = p50(local, who, f"{ME}, {TEST_CLIENT}"), p50(http, who, ME)
        lines.append(
            f"- {who} user, /usage hour, p50: the report {query:.1f} ms, + serializer and JSON "
            f"{full - query:+.1f} ms, + middleware, authentication, throttle, DRF "
            f"{view - full:+.1f} ms, + ASGI, uvicorn and the HTTP client {wire - view:+.1f} ms "
            f"= {wire:.1f} ms. /me: {me_view:.1f} ms through the test client, "
            f"{me_wire:.1f} ms over HTTP."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--requests", type=int, default=300, help="timed requests per row")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved passes over the rows")
    parser.add_argument("--tail", type=int, default=2_000, help="ledger rows not rolled up")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reseed", action="store_true", help="seed even if already seeded")
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the queries")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    if not settings.REDIS_URL or not urlsplit(settings.REDIS_URL).path.strip("/"):
        sys.exit("set REDIS_URL with a database number of your own, e.g. redis://127.0.0.1:6379/9")
    if not 0 < args.tail < args.rows or args.users < 2:
        sys.exit("need 0 < --tail < --rows and --users >= 2")
    check_scratch_database()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    call_command("migrate", verbosity=0)
    seed = Seed(args.rows, args.users, args.tail, args.seed)

    seeded = "already seeded, reused"
    if args.reseed or not is_seeded(seed):
        steps = seed_database(seed)
        seeded = "seeded in " + ", ".join(f"{name} {secs:.1f} s" for name, secs in steps.items())
        seeded += f"; {sum(steps.values()):.0f} s in all"
    print(seeded, flush=True)

    start = datetime.now(UTC) - timedelta(days=REPORT_DAYS)
    people = subjects(seed, start)
    if args.explain:
        explain(people, start)
    load_before = Path("/proc/loadavg").read_text().split()[0]
    keys = bench_keys(people)
    try:
        http, local, sessions = measure(people, keys, start, args)
    finally:
        revoke_api_keys([key for key, _ in keys.values()], actor=None, actor_label=ACTOR)
    load_after = Path("/proc/loadavg").read_text().split()[0]

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        version = cursor.fetchone()[0]
    lines = [
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), PostgreSQL {version}, Redis for the "
        "limiter and the throttle; server and client share the cores "
        f"(1-minute load average {load_before} before, {load_after} after).",
        f"Data: {seeded}.",
        "",
        *data_summary(seed, people),
        "",
        f"{args.requests} sequential requests per row (after {WARMUP} of warm-up) in "
        f"{args.rounds} interleaved rounds, one keep-alive connection per user; "
        f"start = {REPORT_DAYS} days ago, end = now.",
        "",
        *table(http + local),
        "",
        f"PostgreSQL sessions opened while the rows above ran: {sessions:,}, for "
        f"{(args.requests + WARMUP) * (len(http) - 1):,} requests to Django over HTTP.",
        "",
        *overhead(http, local),
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, "api", text)


if __name__ == "__main__":
    main()
