"""Start real server processes (simulator, Daphne, uvicorn) for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Any, timeout: float = 30.0, every: float = 0.01) -> Any:
    """Poll `check` until it gives something true (returned), or fail after `timeout`: how a
    test waits for another process, never with a fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode}:\n{out}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@contextmanager
def running(
    args: list[str],
    ready_url: str,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    cwd: Path = ROOT,
    python: bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `args` (python -m … or manage.py …; with python=False a whole command line) in `cwd`
    until the block ends; output goes to a log file."""
    full_env = {**os.environ, "DEBUG": "1", **(env or {})}
    log_dir = ROOT / "var" / "test-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{Path(args[0]).name}-{os.getpid()}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        command = [sys.executable, *args] if python else args
        proc = subprocess.Popen(
            command, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            try:
                wait_http(ready_url, proc, timeout)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"{exc}\n--- log ---\n{log_path.read_text(errors='replace')}"
                ) from exc
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def simulator(
    model: str = "Qwen/Qwen2.5-7B-Instruct",
    tokens_per_second: float = 2000.0,
    ttft_ms: float = 5.0,
    extra: tuple[str, ...] = (),
) -> Iterator[str]:
    """`extra`: more options, e.g. ("--kind", "openai-generic") for a server without /health."""
    with simulator_process(model, tokens_per_second, ttft_ms, extra) as (url, _proc):
        yield url


@contextmanager
def simulator_process(
    model: str = "Qwen/Qwen2.5-7B-Instruct",
    tokens_per_second: float = 2000.0,
    ttft_ms: float = 5.0,
    extra: tuple[str, ...] = (),
    port: int = 0,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The simulator and its process (to kill it); `port`: a given one (a server restarted
    where it was), else a free one."""
    port = port or free_port()
    args = [
        "manage.py", "simulate_sglang", "--host", "127.0.0.1", "--port", str(port),
        "--model", model, "--tokens-per-second", str(tokens_per_second), "--ttft-ms", str(ttft_ms),
        *extra,
    ]  # fmt: skip
    with running(args, f"http://127.0.0.1:{port}/v1/models") as proc:
        yield f"http://127.0.0.1:{port}", proc


@contextmanager
def ledger_worker(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes] | None]:
    """With REDIS_URL, gateways ship usage events to a Redis stream: run a real Celery worker
    (beat inside) that drains it into the database. Without Redis there is nothing to run."""
    if not os.environ.get("REDIS_URL") and not env.get("REDIS_URL"):
        yield None
        return
    log_dir = ROOT / "var" / "test-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = log_dir / f"celery-{os.getpid()}-{time.monotonic_ns()}"
    with stem.with_suffix(".log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "limiter_site", "worker", "-B", "--pool", "solo",
             "--loglevel", "INFO", "-s", str(stem.with_suffix(".beat"))],
            cwd=ROOT, env={**os.environ, "DEBUG": "1", "LEDGER_DRAIN_SECONDS": "0.2", **env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop a process started with start_new_session=True and every child it forked (celery's
    `-B` beat is a child: killing only the parent would leave it running)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class RedisProcess:
    """A private redis-server on its own port, to stop, kill and restart. `persistent` gives it
    the append-only file the ledger requires (README), in `directory`."""

    def __init__(self, port: int, directory: Path | None = None) -> None:
        self.port = port
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.directory)]
            if self.directory is not None
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """SIGKILL: no chance to save anything on the way out."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextmanager
def busy_cores() -> Iterator[None]:
    """Another process keeping every core busy, as on a loaded CI machine."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 2)
    ]
    try:
        time.sleep(0.2)
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


@contextmanager
def redis_cluster(directory: Path, nodes: int = 3) -> Iterator[list[int]]:
    """A real Redis Cluster of `nodes` masters (redis-server processes on loopback, slots split
    by `redis-cli --cluster create`); yields their ports."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    ports = [free_port() for _ in range(nodes)]
    procs = []
    try:
        for port in ports:
            node_dir = directory / f"node-{port}"
            node_dir.mkdir(parents=True)
            procs.append(subprocess.Popen(
                # The bus port given: the default (port + 10000) may be taken or out of range.
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-port", str(free_port()), "--cluster-config-file", "nodes.conf",
                 "--dir", str(node_dir), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            ))  # fmt: skip
        for port in ports:
            _wait_port(port)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [_cluster_info(cli, p) for p in ports]
            if all("cluster_state:ok" in state for state in states):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
        yield ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _cluster_info(cli: str, port: int) -> str:
    return subprocess.run(
        [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=10
    ).stdout
