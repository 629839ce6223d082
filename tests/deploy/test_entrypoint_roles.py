"""The container roles as real processes, started exactly as the compose file and the Helm chart
start them (deploy/docker/entrypoint.sh ROLE), against Postgres and Redis: migrate on a new
database, the simulator, two gateways, a Celery worker and one beat. A request through each
gateway reaches the ledger through Redis and the worker; a scrape scheduled by beat reaches the
database; the containers' health probe answers for each role; preflight reports what is wrong.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from django.conf import settings

from tests.conftest import _missing
from tests.procs import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
PROBE = ROOT / "deploy" / "docker" / "probe.py"
TOKEN = "roles-monitoring-token-0123456789abcdef"
# Production refuses the quick start's public keys (import_config without DEBUG): a key of
# our own, in a users file of our own.
USER_KEY = "sk-roles-" + uuid.uuid4().hex + uuid.uuid4().hex
USERS_YAML = f"""
users:
  배포점검:
    rpm: 100
    tpm: 100000
    tph: 1000000
    daily: 10000000
    cooldown_minutes: 0
    description: "배포 점검용"
api_keys:
  {USER_KEY}: 배포점검
"""


def _server_url() -> str:
    db = settings.DATABASES["default"]
    if not db["ENGINE"].endswith("postgresql"):
        pytest.fail("the roles test needs DATABASE_URL=postgres://… (CI sets it)")
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgresql://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """An empty database of its own: the migrate role must build the schema from nothing."""
    server = _server_url()
    name = f"ktl_roles_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{server}/{name}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name]
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def role_env(database_url: str, redis_url: str, scratch: Path, **extra: str) -> dict[str, str]:
    """Production settings (no DEBUG), as deploy/compose.yaml sets them."""
    prefix = f"roles-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "DJANGO_SETTINGS_MODULE")}
    return env | {
        "PYTHON": sys.executable,
        "LIMITER_HOME": str(ROOT),
        "SECRET_KEY": uuid.uuid4().hex * 2,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "GATEWAY_MONITORING_TOKEN": TOKEN,
        "LIMITER_REDIS_PREFIX": prefix,
        "LEDGER_STREAM": f"{prefix}:ledger",
        "CELERY_QUEUE": f"{prefix}:tasks",
        "LIMITER_VAR_DIR": str(scratch / "var"),
        # As in the image: collected once (below), served from there.
        "STATIC_ROOT": str(scratch / "static"),
        "STATIC_FROM_APPS": "0",
        "LEDGER_SPOOL_DIR": str(scratch / "var" / "ledger-spool"),  # shared, as in compose
        "LOG_FORMAT": "json",
        "EMBEDDED_BEAT": "0",
        "GATEWAY_SELF_CHECK": "0",
        "GATEWAY_LEDGER_FLUSH_SECONDS": "0.1",
        "LEDGER_DRAIN_SECONDS": "0.3",
        "TELEMETRY_SCRAPE_SECONDS": "1",
        **extra,
    }


class Roles:
    """Processes started through the entrypoint, each with its own TMPDIR (its role marker)."""

    def __init__(self, env: dict[str, str], scratch: Path) -> None:
        self.env = env
        self.scratch = scratch
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.envs: dict[str, dict[str, str]] = {}

    def tmpdir(self, name: str) -> Path:
        path = self.scratch / "tmp" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, name: str) -> str:
        return (self.scratch / f"{name}.log").read_text(errors="replace")

    def run(self, name: str, role: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(ENTRYPOINT), role, *args],
            cwd="/",  # the entrypoint goes to LIMITER_HOME itself
            env=self.env | {"TMPDIR": str(self.tmpdir(name))} | env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def start(self, name: str, role: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        self.envs[name] = self.env | {"TMPDIR": str(self.tmpdir(name))} | env
        with (self.scratch / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                ["sh", str(ENTRYPOINT), role, *args],
                cwd="/",
                env=self.envs[name],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def probe(self, name: str, what: str = "live") -> int:
        """The image's health check (deploy/docker/probe.py) in this role's environment."""
        result = subprocess.run(
            [sys.executable, str(PROBE), what], env=self.envs[name], capture_output=True,
            timeout=60, check=False,
        )  # fmt: skip
        return result.returncode

    def stop_all(self) -> dict[str, int]:
        """SIGTERM to each process (the entrypoint exec'd the server: it gets the signal)."""
        codes = {}
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = proc.wait()
        return codes


def poll(what: str, check: Callable[[], Any], roles: Roles, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in roles.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{roles.log(name)[-4000:]}")
        value = check()
        if value:
            return value
        time.sleep(0.2)
    logs = "\n".join(f"--- {n} ---\n{roles.log(n)[-3000:]}" for n in roles.procs)
    pytest.fail(f"{what}: not within {timeout}s\n{logs}")


def _ready(url: str) -> bool:
    try:
        answer = httpx.get(f"{url}/health/ready", headers={"Authorization": f"Bearer {TOKEN}"})
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def _rows(database_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql, params).fetchall()


@contextmanager
def nginx_in_front(scratch: Path, ports: list[int]) -> Iterator[str]:
    """Debian's nginx with deploy/nginx/gateway.conf. Two edits for a machine without Docker:
    the replicas' addresses instead of Docker's DNS name (and no resolver), and log files."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        _missing("nginx is missing: apt-get install nginx-light (.ci/run does)")
    port = free_port()
    conf = (ROOT / "deploy" / "nginx" / "gateway.conf").read_text()
    conf = re.sub(r"^resolver .*$", "", conf, flags=re.MULTILINE)
    servers = "".join(f"server 127.0.0.1:{p};\n    " for p in ports)
    conf = conf.replace("server gateway:8080 resolve;\n    ", servers)
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace(
        "access_log /dev/stdout limiter;", f"access_log {scratch}/nginx-access.log limiter;"
    )
    (scratch / "gateway.conf").write_text(conf)
    (scratch / "nginx.conf").write_text(
        f"pid {scratch}/nginx.pid;\nerror_log {scratch}/nginx-error.log;\n"
        f"events {{}}\nhttp {{ client_body_temp_path {scratch}/nginx-body; "
        f"proxy_temp_path {scratch}/nginx-proxy; include {scratch}/gateway.conf; }}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(scratch / "nginx.conf"), "-g", "daemon off;"])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def stopping(roles: Roles) -> Iterator[dict[str, int]]:
    codes: dict[str, int] = {}
    try:
        yield codes
    finally:
        codes.update(roles.stop_all())


def test_roles_serve_end_to_end(fresh_database: str, redis_url: str, tmp_path: Path) -> None:
    sim_port, gw1, gw2 = free_port(), free_port(), free_port()
    users = tmp_path / "users.yaml"
    users.write_text(USERS_YAML, encoding="utf-8")
    env = role_env(
        fresh_database, redis_url, tmp_path,
        SGLANG_URL=f"http://127.0.0.1:{sim_port}",
        LIMITER_IMPORT_CONFIG=f"config/sglang_korean.yaml {users}",
    )  # fmt: skip
    roles = Roles(env, tmp_path)

    collected = roles.run("collectstatic", "manage", "collectstatic", "--no-input", "-v", "0")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    # The pre-flight on a database nobody migrated yet says so (and fails).
    early = roles.run("preflight", "preflight")
    assert early.returncode == 1 and "accounts.E012" in early.stderr, early.stderr
    migrated = roles.run("migrate", "migrate")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert _rows(fresh_database, "SELECT count(*) FROM gateway_servedmodel")[0][0] >= 1

    with ExitStack() as stack:
        codes = stack.enter_context(stopping(roles))
        roles.start("simulator", "simulator", "--tokens-per-second", "2000",
                    SIMULATOR_HOST="127.0.0.1", SIMULATOR_PORT=str(sim_port))  # fmt: skip
        for name, port in (("gateway-1", gw1), ("gateway-2", gw2)):
            roles.start(name, "gateway", GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(port))
        roles.start("worker", "worker", "--pool", "solo")
        roles.start("beat", "beat")

        urls = [f"http://127.0.0.1:{gw1}", f"http://127.0.0.1:{gw2}"]
        for url in urls:
            poll(f"{url} ready", functools.partial(_ready, url), roles, timeout=120)

        request_ids = []
        for url in urls:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0)
            answer = client.chat.completions.with_raw_response.create(
                model="korean-qwen",
                messages=[{"role": "user", "content": "안녕하세요, 배포 점검입니다."}],
                max_tokens=8,
            )
            assert answer.parse().choices[0].message.content
            request_ids.append(answer.headers["x-request-id"])
            stream = client.chat.completions.create(
                model="korean-qwen",
                messages=[{"role": "user", "content": "스트리밍도 확인합니다."}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = [chunk.usage for chunk in stream if chunk.usage]
            assert usage and usage[-1].completion_tokens == 8

        # deploy/nginx/gateway.conf in front of both, as in compose: requests spread over the
        # gateways, streams pass unbuffered, /metrics is not reachable through it.
        proxy = stack.enter_context(nginx_in_front(tmp_path, [gw1, gw2]))
        client = openai.OpenAI(base_url=f"{proxy}/v1", api_key=USER_KEY, max_retries=0)
        for _ in range(4):
            answer = client.chat.completions.with_raw_response.create(
                model="korean-qwen", messages=[{"role": "user", "content": "프록시"}], max_tokens=4
            )
            request_ids.append(answer.headers["x-request-id"])
        stream = client.chat.completions.create(
            model="korean-qwen", messages=[{"role": "user", "content": "프록시 스트림"}],
            max_tokens=6, stream=True,
        )  # fmt: skip
        assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) == 6
        assert (
            httpx.get(f"{proxy}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
            == 404
        )
        upstreams = [
            json.loads(line)["upstream"]
            for line in (tmp_path / "nginx-access.log").read_text().splitlines()
        ]
        assert {f"127.0.0.1:{gw1}", f"127.0.0.1:{gw2}"} <= set(upstreams)

        # Gateways → Redis stream → the worker (its drain scheduled by beat) → Postgres.
        def billed() -> list[tuple[Any, ...]]:
            rows = _rows(
                fresh_database,
                "SELECT request_id, completion_tokens FROM quotas_usagerecord "
                "WHERE request_id = ANY(%s)",
                (request_ids,),
            )
            return rows if len(rows) == len(request_ids) else []

        rows = poll("ledger rows from both gateways and the proxy", billed, roles)
        assert sorted(r[1] for r in rows) == [4, 4, 4, 4, 8, 8]
        total = poll(
            "all nine requests in the ledger",
            lambda: (
                (n := _rows(fresh_database, "SELECT count(*) FROM quotas_usagerecord")[0][0]) >= 9
                and n
            ),
            roles,
        )
        assert total == 9  # 2 + 2 streamed direct, 4 + 1 streamed through nginx
        # Beat's scrape schedule, run by the worker, against the simulator.
        poll(
            "an SGLang sample scraped",
            lambda: _rows(fresh_database, "SELECT count(*) FROM telemetry_sglangsample")[0][0],
            roles,
        )

        # The containers' health probe, for each role, and readiness through it.
        for name in ("gateway-1", "gateway-2", "simulator", "worker", "beat"):
            assert roles.probe(name) == 0, name
        assert roles.probe("gateway-1", "ready") == 0
        # With everything up: no error; the model was never self-checked (turned off here).
        preflight = roles.run("preflight", "preflight")
        assert preflight.returncode == 0, preflight.stderr
        found = set(re.findall(r"\((\w+\.[EW]\d+)\)", preflight.stderr))
        assert {i for i in found if not i.startswith("security.")} == {"gateway.W011"}, found

        # LOG_FORMAT=json: every line of every role is a JSON object; the gateways' lines of a
        # request carry its id; no key in clear anywhere.
        for name in roles.procs:
            assert USER_KEY not in roles.log(name), name
            for line in roles.log(name).splitlines():
                assert isinstance(json.loads(line), dict), (name, line)
        logged = [json.loads(line) for line in roles.log("gateway-1").splitlines()]
        assert {"time", "level", "logger", "message", "request_id"} <= set(logged[0])
        # The access line of the first request carries the id the client got back.
        assert any(
            line["request_id"] == request_ids[0] and "/v1/chat/completions" in line["message"]
            for line in logged
        )

    # Every server stops on SIGTERM by itself (the entrypoint exec'd it; no shell in between).
    # uvicorn, once shut down gracefully, re-raises the signal, as a terminated process should.
    assert codes == dict.fromkeys(codes, 0) | {"gateway-1": -15, "gateway-2": -15}, codes
    for name in ("gateway-1", "gateway-2"):
        assert "Application shutdown complete" in roles.log(name)
    for name in ("gateway-1", "gateway-2"):
        assert roles.probe(name) == 1, f"{name} still answers after it stopped"
